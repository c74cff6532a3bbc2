"""From YAML text and plain dicts to frozen dataclasses: the parsing behind `gtaseg.config`.

`dataclass_from_dict` builds any frozen dataclass tree from a nested dict, checking every value
against the field's type hint (Literal, unions, tuples, dicts, nested dataclasses) and rejecting
unknown keys; `parse_yaml` / `read_yaml` read YAML with one-line errors. `gtaseg.config` (the run)
and `pipelines.params` (the pipeline) both parse with it, so both report a bad key the same way.
Every error is a `ConfigError` naming the key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gtaseg.errors import GtasegError


class ConfigError(GtasegError, ValueError):
    """A config value or key is invalid; the message says where, what was expected and the fix."""


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type `hint`; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}.")
        return dataclass_from_dict(hint, value, key)
    if origin is Literal:
        return _coerce_literal(value, hint, key)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, hint, key)
    if origin in (tuple, dict):
        return _coerce_container(value, hint, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) and hint is not bool or not isinstance(value, hint):
            raise ConfigError(
                f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}."
            )
        return value
    raise TypeError(f"unsupported config type {hint!r} at {key}")  # internal: a schema bug


def _coerce_literal(value: Any, hint: Any, key: str) -> Any:
    allowed = typing.get_args(hint)
    if value is False and "off" in allowed:
        # YAML 1.1 (PyYAML) reads a bare `off` as false; YAML 1.2 writers such as
        # `dvc exp run --set-param` write the string "off" bare.
        return "off"
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}.")
    return value


def _coerce_union(value: Any, hint: Any, key: str) -> Any:
    """The first member type that accepts `value`; a single member's own error if only one
    could apply, else one error listing them all."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, arg, key)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    expected = " or ".join(_hint_name(a) for a in args if a is not type(None))
    raise ConfigError(f"{key}: expected {expected}, got {value!r}. Fix the value in params.yaml.")


def _coerce_container(value: Any, hint: Any, key: str) -> Any:
    """`tuple[X, ...]`, `tuple[X, Y]` (from a YAML list) and `dict[K, V]`, item by item."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}.")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}.")
        k_hint, v_hint = args
        return {_coerce(k, k_hint, key): _coerce(v, v_hint, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}.")
    pairs = enumerate(zip(value, args, strict=True))
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)


def dataclass_from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from `raw`, every value checked against its field's type
    (nested dataclasses built the same way); missing keys take the fields' defaults.

    `prefix` is the dotted key of `raw` in the whole document ("" at the top), used in messages.
    Raises ConfigError on an unknown key or a value of the wrong type; the dataclass's own
    `__post_init__` checks raise theirs.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; expected keys of "
            f"{prefix or 'the top level'}: {sorted(names)}. Check the spelling in params.yaml."
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`; a syntax error is a one-line ConfigError naming `source` (a file,
    an override), the line and column, and what to fix, the same wherever YAML is read."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(
            f"{source} is not valid YAML{line}: {problem}. Fix the syntax (indentation, brackets, "
            f"quotes, a ':' after each key)."
        ) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in the file `path` (see `parse_yaml`); text that is not UTF-8 is a
    ConfigError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): expected a YAML file."
        ) from None
    return parse_yaml(text, str(path))
