"""Split files: the three id-list formats, make/write/load/import, and their error cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtaseg.data.formats import DataError
from gtaseg.data.splits import (
    import_split,
    load_split,
    make_split,
    parse_amount,
    parse_id_list,
    write_split,
)

IDS = [f"2007_{k:06d}" for k in range(40)]


@pytest.mark.parametrize("trailing", ["", "\n", "\r\n"])
def test_parse_bare_ids(tmp_path: Path, trailing: str) -> None:
    path = tmp_path / "labeled.txt"
    path.write_text("2007_000733\n\n2007_000032" + trailing, newline="")
    assert parse_id_list(path) == ["2007_000733", "2007_000032"]


@pytest.mark.parametrize("trailing", ["", "\n"])
def test_parse_cityscapes_paths(tmp_path: Path, trailing: str) -> None:
    path = tmp_path / "labeled.txt"
    path.write_text(
        "leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png\n"
        "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png" + trailing
    )
    assert parse_id_list(path) == ["hamburg/hamburg_000000_080169", "aachen/aachen_000001_000019"]


@pytest.mark.parametrize("trailing", ["", "\n"])
def test_parse_voc_pairs(tmp_path: Path, trailing: str) -> None:
    path = tmp_path / "train_aug.txt"
    path.write_text(
        "JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png\n"
        "/JPEGImages/2008_000002.jpg /SegmentationClassAug/2008_000002.png" + trailing
    )
    assert parse_id_list(path) == ["2007_000032", "2008_000002"]


def test_parse_rejects_empty_missing_and_duplicates(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt is empty"):
        parse_id_list(empty)
    with pytest.raises(DataError, match="nope.txt does not exist"):
        parse_id_list(tmp_path / "nope.txt")
    twice = tmp_path / "twice.txt"
    twice.write_text("a\nb\na")
    with pytest.raises(DataError, match=r"twice.txt.*\['a'\]"):
        parse_id_list(twice)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1/16", 0.0625), ("1_8", 0.125), ("0.0625", 0.0625), ("183", 183), ("full", 1.0)],
)
def test_parse_amount(text: str, value: float | int) -> None:
    parsed = parse_amount(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_amount_rejects_garbage() -> None:
    with pytest.raises(DataError, match="1/16"):
        parse_amount("a sixteenth")


def test_make_split_ratio_is_deterministic_disjoint_and_covering() -> None:
    labeled, unlabeled = make_split(IDS, 0.25, seed=3)
    assert len(labeled) == 10 and len(unlabeled) == 30
    assert set(labeled).isdisjoint(unlabeled) and set(labeled) | set(unlabeled) == set(IDS)
    assert (labeled, unlabeled) == make_split(list(reversed(IDS)), 0.25, seed=3)
    assert make_split(IDS, 0.25, seed=4)[0] != labeled
    assert labeled == sorted(labeled)


def test_make_split_rounds_ratio_and_keeps_one() -> None:
    assert len(make_split(IDS, 1 / 16, seed=0)[0]) == round(40 / 16)
    assert len(make_split(IDS, 0.001, seed=0)[0]) == 1
    assert make_split(IDS, 1.0, seed=0) == (sorted(IDS), [])


def test_make_split_count() -> None:
    labeled, unlabeled = make_split(IDS, 7, seed=0)
    assert len(labeled) == 7 and len(unlabeled) == 33
    assert len(make_split(IDS, 1, seed=0)[0]) == 1  # int 1 is a count, not "all"


def test_make_split_is_uniform() -> None:
    counts = dict.fromkeys(IDS, 0)
    for seed in range(400):
        for i in make_split(IDS, 4, seed)[0]:
            counts[i] += 1
    expected = 400 * 4 / 40
    assert all(0.5 * expected < c < 1.5 * expected for c in counts.values())


@pytest.mark.parametrize(
    ("amount", "message"),
    [(0.0, r"\(0, 1\].*40 ids"), (1.5, r"\(0, 1\]"), (41, r"\[1, 40\]"), (0, r"\[1, 40\]"),
     (-2, r"\[1, 40\]"), (True, "ratio")],
)  # fmt: skip
def test_make_split_rejects_bad_amounts(amount: float | int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make_split(IDS, amount, seed=0)


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    labeled, unlabeled = make_split(IDS, 5, seed=1)
    write_split(tmp_path / "split", labeled, unlabeled)
    text = (tmp_path / "split" / "labeled.txt").read_text()
    assert text.splitlines() == labeled and text.endswith("\n")
    assert load_split(tmp_path / "split", IDS) == (labeled, unlabeled)
    assert not [p for p in (tmp_path / "split").iterdir() if p.name.startswith(".")]


def test_load_split_unlabeled_optional_or_empty(tmp_path: Path) -> None:
    (tmp_path / "labeled.txt").write_text("2007_000001")
    assert load_split(tmp_path, IDS) == (["2007_000001"], [])
    (tmp_path / "unlabeled.txt").write_text("")
    assert load_split(tmp_path, IDS) == (["2007_000001"], [])


def test_load_split_names_unknown_ids(tmp_path: Path) -> None:
    (tmp_path / "labeled.txt").write_text("2007_000001\n" + "\n".join(f"x{k}" for k in range(7)))
    with pytest.raises(
        DataError, match=r"labeled.txt: 7 id\(s\).*\['x0', 'x1', 'x2', 'x3', 'x4'\]"
    ):
        load_split(tmp_path, IDS)


def test_load_split_names_overlap(tmp_path: Path) -> None:
    (tmp_path / "labeled.txt").write_text("2007_000001\n2007_000002")
    (tmp_path / "unlabeled.txt").write_text("2007_000002\n2007_000003")
    with pytest.raises(DataError, match=r"both labelled and unlabelled.*2007_000002"):
        load_split(tmp_path, IDS)


def test_load_split_empty_or_missing_labeled(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="labeled.txt does not exist"):
        load_split(tmp_path, IDS)
    (tmp_path / "labeled.txt").write_text("\n")
    with pytest.raises(DataError, match="labelled list is empty"):
        load_split(tmp_path, IDS)


def test_write_split_checks_before_writing(tmp_path: Path) -> None:
    write_split(tmp_path, ["a"], ["b"])
    with pytest.raises(DataError, match="both labelled and unlabelled"):
        write_split(tmp_path, ["c", "d"], ["d"])
    with pytest.raises(DataError, match="empty"):
        write_split(tmp_path, [], ["d"])
    assert load_split(tmp_path, ["a", "b"]) == (["a"], ["b"])


def test_write_split_failure_leaves_old_split(tmp_path: Path, monkeypatch) -> None:
    import gtaseg.io

    write_split(tmp_path, ["a"], ["b"])

    def failing_open(path, *args, **kw):
        if Path(path).name.startswith(".labeled.txt"):  # the second temporary file
            raise OSError("disk full")
        return open(path, *args, **kw)

    monkeypatch.setattr(gtaseg.io, "open", failing_open, raising=False)
    with pytest.raises(OSError, match="disk full"):
        write_split(tmp_path, ["c"], ["a", "b"])
    monkeypatch.undo()
    assert load_split(tmp_path, ["a", "b", "c"]) == (["a"], ["b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labeled.txt", "unlabeled.txt"]


def test_import_original_repo_lists(tmp_path: Path) -> None:
    src = tmp_path / "splits" / "pascal" / "183"
    src.mkdir(parents=True)
    (src / "labeled.txt").write_text("2007_000003\n2007_000001")  # no trailing newline
    (src / "unlabeled.txt").write_text("2007_000002\n2007_000004")
    out = tmp_path / "ours"
    expected = (["2007_000003", "2007_000001"], ["2007_000002", "2007_000004"])
    assert import_split(src, out, IDS) == expected
    assert load_split(out, IDS) == expected


def test_import_pairs_and_derive_unlabeled(tmp_path: Path) -> None:
    pairs = tmp_path / "labeled_pairs.txt"
    pairs.write_text("JPEGImages/2007_000005.jpg SegmentationClassAug/2007_000005.png\n")
    labeled, unlabeled = import_split((pairs, None), tmp_path / "out", IDS)
    assert labeled == ["2007_000005"] and unlabeled == sorted(set(IDS) - {"2007_000005"})


def test_import_rejects_ids_outside_dataset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "labeled.txt").write_text("2012_999999")
    with pytest.raises(DataError, match="2012_999999"):
        import_split(src, tmp_path / "out", IDS)
    assert not (tmp_path / "out").exists()


def test_labeled_pool_draws_labels_from_the_pool_only() -> None:
    """Classic VOC: labelled ids from the 1,464 fine masks, every other id of the 10,582
    unlabelled; a ratio counts in the pool (92 = 1,464 / 16)."""
    ids = [f"id{k:03d}" for k in range(100)]
    pool = ids[::4]  # 25 ids
    labeled, unlabeled = make_split(ids, 0.2, 0, labeled_pool=pool)
    assert len(labeled) == 5 and set(labeled) <= set(pool)
    assert sorted(labeled + unlabeled) == ids
    full, rest = make_split(ids, 1.0, 0, labeled_pool=pool + ["not_a_training_id"])
    assert full == sorted(pool) and len(rest) == 75
    with pytest.raises(DataError, match="data.labeled_pool"):
        make_split(ids, 0.2, 0, labeled_pool=["elsewhere"])
