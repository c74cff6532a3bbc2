"""Id lists: plain text, one image id per line. `parse_id_list` reads the lists other codebases
ship: bare ids (`2007_000733`), Cityscapes paths
(`leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png` ->
`hamburg/hamburg_000000_080169`) and VOC pairs (`JPEGImages/x.jpg SegmentationClassAug/x.png` ->
`x`), with or without a trailing newline.

A leaf of the data layer: dataset formats read their id lists with it, split files are id lists.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from gtaseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CITYSCAPES_SUFFIXES = ("_leftImg8bit.png", "_gtFine_labelIds.png")


def entry_to_id(entry: str) -> str:
    """The image id an id-list entry names (first whitespace-separated field of a line)."""
    first = entry.split()[0].replace("\\", "/")
    for suffix in _CITYSCAPES_SUFFIXES:
        if first.endswith(suffix):
            city, name = first.split("/")[-2:] if "/" in first else ("", first)
            stem = name.removesuffix(suffix)
            return f"{city}/{stem}" if city else stem
    name = first.rsplit("/", 1)[-1]
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in IMAGE_SUFFIXES else first


def parse_lines(path: Path) -> list[str]:
    """Ids of an existing id list, in file order (blank lines skipped; may be empty)."""
    if not path.is_file():
        raise DataError(
            f"id list {path} does not exist: expected a text file with one id per line."
        )
    text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: tolerate a byte-order mark
    ids = [entry_to_id(line) for line in text.splitlines() if line.strip()]
    repeated = [i for i, count in Counter(ids).items() if count > 1]
    if repeated:
        raise DataError(
            f"id list {path} lists {len(repeated)} id(s) more than once, e.g. {repeated[:5]}: "
            f"expected each id once. Remove the duplicates."
        )
    return ids


def parse_id_list(path: Path) -> list[str]:
    """Ids in file order from an id list in any accepted format; blank lines are skipped.

    Raises DataError when the file is missing, empty or repeats an id.
    """
    ids = parse_lines(Path(path))
    if not ids:
        raise DataError(f"id list {path} is empty: expected at least one id per line.")
    return ids
