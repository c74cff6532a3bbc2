"""The module graph has no circles: every module of gtaseg/ and pipelines/ can be read, imported
and tested on its own, after the modules it uses (imports inside functions count too: they only
hide a circle until the function runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (absolute imports, anywhere in the file)."""
    modules = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c` imports module a.b.c when there is one, else names of a.b
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (depth-first search)."""
    found, done, path = [], set(), []

    def visit(node: str) -> None:
        if node in path:
            found.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        path.append(node)
        for target in sorted(graph[node]):
            visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["gtaseg", "pipelines"])
def test_no_import_circles(package):
    graph = import_graph(package)
    assert "gtaseg.data.id_lists" in graph or package != "gtaseg"  # the graph was read
    assert circles(graph) == []


def imported_packages(path: Path) -> set[str]:
    """Top-level names of the packages `path` imports (absolute imports, anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_the_library_imports_no_orchestration_and_mlflow_only_in_its_adapter():
    """gtaseg/ runs without the pipeline's services: never prefect, dvc or boto3; mlflow only in
    the adapter modules in gtaseg/tracking/."""
    found = {
        path.relative_to(ROOT).as_posix(): imported_packages(path)
        for path in (ROOT / "gtaseg").rglob("*.py")
    }
    assert found["gtaseg/tracking/mlflow_tracker.py"] >= {"mlflow"}  # the check sees imports
    forbidden = {"prefect", "dvc", "boto3", "botocore"}
    assert {p: sorted(n & forbidden) for p, n in found.items() if n & forbidden} == {}
    with_mlflow = {p for p, names in found.items() if "mlflow" in names}
    assert with_mlflow == {
        "gtaseg/tracking/mlflow_tracker.py",
        "gtaseg/tracking/outbox.py",
        "gtaseg/tracking/model_format.py",
    }
