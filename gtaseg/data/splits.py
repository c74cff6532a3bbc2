"""Labelled / unlabelled split files: plain text, one image id per line, as in the literature.

A split folder holds `labeled.txt` (required, non-empty) and `unlabeled.txt` (optional; empty or
absent means fully supervised). Imported lists may be in any format `id_lists.parse_id_list`
reads (bare ids, Cityscapes paths, VOC pairs).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from gtaseg.config import DataConfig
from gtaseg.data.formats import list_samples
from gtaseg.data.id_lists import parse_id_list, parse_lines
from gtaseg.errors import DataError
from gtaseg.io import write_atomic_all

LABELED_FILE = "labeled.txt"
UNLABELED_FILE = "unlabeled.txt"


def parse_amount(text: str) -> float | int:
    """ "1/16" or "1_16" or "0.0625" -> ratio (float); "183" -> count (int); "full" -> 1.0."""
    value = str(text).strip().lower()
    if value == "full":
        return 1.0
    if value.isdigit():
        return int(value)
    try:
        if "/" in value or "_" in value:
            return float(Fraction(value.replace("_", "/")))
        return float(value)
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"label amount {text!r}: expected a ratio such as 1/16 or 0.0625, a count such as "
            f"183, or 'full'."
        ) from None


def make_split(
    ids: Sequence[str],
    amount: float | int,
    seed: int,
    labeled_pool: Collection[str] | None = None,
) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled): disjoint, covering `ids`, both sorted; labelled drawn uniformly.

    `amount`: float in (0, 1] = ratio (round(ratio * n), at least 1); int >= 1 = count. With
    `labeled_pool`, labelled ids are drawn only from the ids in it (n = their number; every other
    id is unlabelled), as the classic VOC splits draw from the 1,464 finely annotated images and
    leave the rest of the 10,582 unlabelled. The draw depends only on the set of ids and `seed`,
    not on their order.
    """
    if len(set(ids)) != len(ids):
        raise DataError(f"make_split: the {len(ids)} ids contain duplicates; expected unique ids.")
    everything = sorted(set(ids))
    if labeled_pool is None:
        return _draw(everything, amount, seed)
    allowed = set(labeled_pool)
    pool = [i for i in everything if i in allowed]
    if not pool:
        raise DataError(
            f"data.labeled_pool: none of its {len(labeled_pool)} ids is a training id of this "
            f"dataset ({len(everything)} ids): expected a list of training ids to draw labelled "
            f"images from. Fix data.labeled_pool or set it to null."
        )
    labeled, _ = _draw(pool, amount, seed)
    chosen = set(labeled)
    return labeled, [i for i in everything if i not in chosen]


def _draw(pool: list[str], amount: float | int, seed: int) -> tuple[list[str], list[str]]:
    """(labelled, the rest) of the sorted unique `pool`."""
    n = len(pool)
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise DataError(f"label amount: expected a ratio (float) or count (int), got {amount!r}.")
    if isinstance(amount, float):
        if not 0 < amount <= 1:
            raise DataError(
                f"label ratio {amount}: expected a ratio in (0, 1] (dataset has {n} ids) or an "
                f"integer count in [1, {n}]."
            )
        count = max(1, round(amount * n))
    else:
        if not 1 <= amount <= n:
            raise DataError(
                f"label count {amount}: expected an integer in [1, {n}] (the dataset has {n} ids) "
                f"or a ratio in (0, 1]."
            )
        count = amount
    chosen = np.random.default_rng(seed).choice(n, size=count, replace=False)
    is_labeled = np.zeros(n, dtype=bool)
    is_labeled[chosen] = True
    labeled = [i for i, lab in zip(pool, is_labeled, strict=True) if lab]
    unlabeled = [i for i, lab in zip(pool, is_labeled, strict=True) if not lab]
    return labeled, unlabeled


def _check_split(
    labeled: Sequence[str],
    unlabeled: Sequence[str],
    available: Collection[str] | None,
    sources: tuple[str, str],
) -> None:
    """DataError unless labelled is non-empty, the lists are disjoint and all ids available."""
    if not labeled:
        raise DataError(
            f"{sources[0]}: the labelled list is empty: expected at least one labelled id. "
            f"Make a new split with a larger amount."
        )
    both = sorted(set(labeled) & set(unlabeled))
    if both:
        raise DataError(
            f"{sources[0]} and {sources[1]}: {len(both)} id(s) are both labelled and unlabelled, "
            f"e.g. {both[:5]}: expected disjoint lists. Remove them from one of the files."
        )
    if available is not None:
        known = set(available)
        for source, ids in zip(sources, (labeled, unlabeled), strict=True):
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise DataError(
                    f"{source}: {len(unknown)} id(s) are not in the dataset's train set "
                    f"({len(known)} ids), e.g. {unknown[:5]}. Check data.root / data.format or "
                    f"regenerate the split for this dataset."
                )


def write_split(out_dir: Path, labeled: Sequence[str], unlabeled: Sequence[str]) -> None:
    """Write out_dir/labeled.txt and unlabeled.txt (one id per line), after checking them.

    Nothing is written when the check fails; each file is replaced atomically.
    """
    out_dir = Path(out_dir)
    _check_split(
        labeled, unlabeled, None, (str(out_dir / LABELED_FILE), str(out_dir / UNLABELED_FILE))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic_all(
        {
            out_dir / UNLABELED_FILE: "".join(f"{i}\n" for i in unlabeled),
            out_dir / LABELED_FILE: "".join(f"{i}\n" for i in labeled),
        }
    )


def load_split(split_dir: Path, available: Collection[str]) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) from a split folder, checked against the dataset ids `available`."""
    split_dir = Path(split_dir)
    labeled_path = split_dir / LABELED_FILE
    if not labeled_path.is_file():
        raise DataError(
            f"split file {labeled_path} does not exist: expected {LABELED_FILE} (and optionally "
            f"{UNLABELED_FILE}) in data.split_dir. Create it with gtaseg.data.splits.write_split "
            f"or import_split, or fix data.split_dir."
        )
    labeled = parse_lines(labeled_path)
    unlabeled_path = split_dir / UNLABELED_FILE
    unlabeled = parse_lines(unlabeled_path) if unlabeled_path.is_file() else []
    _check_split(labeled, unlabeled, available, (str(labeled_path), str(unlabeled_path)))
    return labeled, unlabeled


def import_split(
    src_dir_or_files: Path | tuple[Path, Path | None],
    out_dir: Path,
    available: Collection[str],
) -> tuple[list[str], list[str]]:
    """Import canonical lists (a folder with labeled.txt/unlabeled.txt, or a (labeled, unlabeled)
    pair of files in any parse_id_list format) into out_dir, after checking them.

    A missing unlabelled list means: every available id that is not labelled.
    """
    if isinstance(src_dir_or_files, tuple):
        labeled_path, unlabeled_path = src_dir_or_files
    else:
        src = Path(src_dir_or_files)
        labeled_path, unlabeled_path = src / LABELED_FILE, src / UNLABELED_FILE
    labeled = parse_id_list(Path(labeled_path))
    if unlabeled_path is not None and Path(unlabeled_path).is_file():
        unlabeled = parse_lines(Path(unlabeled_path))
    else:
        unlabeled = sorted(set(available) - set(labeled))
    _check_split(labeled, unlabeled, available, (str(labeled_path), str(unlabeled_path)))
    write_split(Path(out_dir), labeled, unlabeled)
    return labeled, unlabeled


def draw_split(cfg: DataConfig, amount: float | int, seed: int) -> tuple[list[str], list[str]]:
    """A new (labeled, unlabeled) split of the dataset `cfg` describes: labelled ids drawn from
    `cfg.labeled_pool` when set (see `make_split`), the other training ids unlabelled."""
    ids = list(list_samples(cfg, "train"))
    pool = parse_id_list(Path(cfg.labeled_pool)) if cfg.labeled_pool else None
    return make_split(ids, amount, seed, pool)
