"""The performance contract: our faithful step computes what the original's iteration computes,
the step makes no host syncs, forward units are 15 / 7 / 3, and `gtaseg bench` reports them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from gtaseg.bench.probes import HostSyncCounter, count_host_syncs, count_units
from gtaseg.cli import main
from gtaseg.config import config_from_dict
from gtaseg.data.loaders import make_train_data
from gtaseg.methods import gta, supervised
from gtaseg.methods.reference import reference_step
from gtaseg.methods.state import build_state, set_lrs

CPU = torch.device("cpu")


def _state_past_alias_epoch(raw, dropout=True, **semi):
    """A GTA state after the warm-up and the alias epoch, with three distinct networks and filled
    momentum buffers, and the epoch's batches. Reaching that point by training would take two
    epochs; perturbing the assistant and teacher and taking one step gives the same situation
    (for the timing and counting tests; the equality tests start at the warm-up's end)."""
    state, batches = _state_at_warmup_end(raw, dropout, **semi)
    state.iteration = state.warmup_iters + state.iters_per_epoch
    _run(state, gta.train_step, batches[0])
    return state, batches


def _state_at_warmup_end(raw, dropout=True, double=False, **semi):
    """A fresh GTA state at the first semi-supervised iteration, assistant and teacher perturbed
    (their parameters are replaced at the switch; their BN buffers are not), and one epoch of
    batches. `double`: networks and images in float64, so that rounding differences between two
    implementations stay far below any decision (an argmax, a percentile) for many steps."""
    raw = {**raw, "semi": {**raw["semi"], **semi}}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    data = make_train_data(cfg.data, 2, 2, 0)
    state = build_state(cfg, CPU, data.iters_per_epoch)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (state.assistant, state.teacher):
            for p in net.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
            for b in net.buffers():
                if b.is_floating_point():
                    b.add_(0.01 * torch.rand(b.shape, generator=gen))
    for module in (
        m for net in (state.student, state.assistant, state.teacher) for m in net.modules()
    ):
        if isinstance(module, torch.nn.Dropout) and not dropout:
            module.p = 0.0
    batches = list(data.epoch(0))
    if double:
        for net in (state.student, state.assistant, state.teacher):
            net.double()
        batches = [b._replace(x_l=b.x_l.double(), x_u=b.x_u.double()) for b in batches]
    state.iteration = state.warmup_iters
    return state, batches


@pytest.fixture
def short_epoch_raw(tiny_raw, tmp_path):
    """tiny_raw with 4 labelled and 6 unlabelled ids: a 3-iteration epoch, so the comparisons
    below pass through the whole alias epoch in 6 float64 steps instead of 12."""
    from gtaseg.data.splits import write_split

    split = Path(tiny_raw["data"]["split_dir"])
    labeled = (split / "labeled.txt").read_text().split()[:4]
    unlabeled = (split / "unlabeled.txt").read_text().split()[:6]
    write_split(tmp_path / "short_split", labeled, unlabeled)
    return {**tiny_raw, "data": {**tiny_raw["data"], "split_dir": str(tmp_path / "short_split")}}


def _run(state, step, batch):
    set_lrs(state)
    out = step(state, batch)
    state.iteration += 1
    return out


def _relative_gaps(ours, ref) -> dict[str, float]:
    """||a - b|| / ||b|| for every network tensor (parameters and BN buffers) and every optimiser
    state tensor (momentum buffers) of the two states, keyed by name."""
    gaps = {}
    for role in ("student", "assistant", "teacher"):
        theirs = getattr(ref, role).state_dict()
        for name, tensor in getattr(ours, role).state_dict().items():
            gaps[f"{role}.{name}"] = _gap(tensor, theirs[name])
    for opt in ("opt_student", "opt_assistant"):
        theirs = getattr(ref, opt).state_dict()["state"]
        for key, slot in getattr(ours, opt).state_dict()["state"].items():
            for name, value in slot.items():  # SGD: momentum_buffer; AdamW: exp_avg, ...
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    gaps[f"{opt}.{key}.{name}"] = _gap(value, theirs[key][name])
    return gaps


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) if b.numel() else 0.0


def _compare_steps(state, batches, our_step, steps):
    """`steps` iterations of `our_step` on `state` and of the reference on a copy, from one RNG
    state and on the same batches; returns the worst relative loss gap over the steps and the
    relative gaps of every tensor afterwards."""
    ours, ref = state, copy.deepcopy(state)
    rng = torch.get_rng_state()
    out_ours = [_run(ours, our_step, batches[k % len(batches)]) for k in range(steps)]
    torch.set_rng_state(rng)
    out_ref = [_run(ref, reference_step, batches[k % len(batches)]) for k in range(steps)]
    loss_gap = max(
        _gap(a.losses[k], b.losses[k])
        for a, b in zip(out_ours, out_ref, strict=True)
        for k in ("loss_sup", "loss_unsup")
    )
    return loss_gap, _relative_gaps(ours, ref)


@pytest.mark.slow  # minutes each on a busy 2-core machine: the full suite runs them
@pytest.mark.parametrize(
    "dropout, mix, head",
    [(False, "cutmix", "smp"), (True, "cutmix", "smp"), (True, "classmix", "original")],
)
def test_faithful_steps_equal_the_original_through_the_alias_epoch(
    short_epoch_raw, dropout, mix, head
):
    """Our faithful step and the transcribed original, from the warm-up's end through the alias
    epoch and three steps past it, on the same batches, agree in every loss, parameter, BN
    buffer and momentum buffer of the three networks (with smp's head and the original's).

    The reference re-binds tensors as the original does (`t.data = s.data` in the alias epoch),
    so the student's and the assistant's classifiers stay one tensor afterwards; ours copies
    values (`semi.classifier_tie`, lasting under `warmup_copy: alias`). It mixes with its own
    transcription of the original's masks and blend. Both run in float64: the EMAs round
    differently (`_foreach_lerp_` against d * t + (1 - d) * s), and in float32 such differences
    flip near-tied argmax pixels of the pseudo-labels within a few steps on this tiny model;
    in float64 they stay ~1e-12. Dropout draws from the global RNG: equality with dropout on
    needs the networks forwarded in the original's order (assistant, then teacher).
    """
    raw = {**short_epoch_raw, "model": {**short_epoch_raw["model"], "head": head}}
    state, batches = _state_at_warmup_end(
        raw, dropout, double=True, mix_prob=1.0, mix=mix, warmup_copy="alias"
    )
    assert state.iters_per_epoch == 3
    steps = state.iters_per_epoch + 3
    loss_gap, gaps = _compare_steps(state, batches, gta.train_step, steps)
    assert loss_gap < 1e-6, loss_gap
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] < 1e-6, (worst, gaps[worst])


@pytest.mark.slow
@pytest.mark.parametrize("change", [{"efficient": True}, {"classifier_tie": "off"}])
def test_equality_check_catches_a_different_step(short_epoch_raw, change):
    """Controls: the efficient step (fewer passes), and the faithful step without the lasting
    classifier tie, are told apart from the original's."""
    state, batches = _state_at_warmup_end(
        short_epoch_raw, False, double=True, mix_prob=1.0, warmup_copy="alias", **change
    )
    _, gaps = _compare_steps(state, batches, gta.train_step, state.iters_per_epoch + 3)
    assert max(gaps.values()) > 1e-3


def test_reference_refuses_the_warmup(tiny_raw):
    from gtaseg.config import ConfigError

    state, batches = _state_at_warmup_end(tiny_raw)
    state.iteration = state.warmup_iters - 1
    with pytest.raises(ConfigError, match="past the warm-up"):
        reference_step(state, batches[1])


def test_sync_counter_tells_device_reads_from_host_draws():
    values = torch.arange(10.0)
    gen = torch.Generator().manual_seed(0)
    assert count_host_syncs(lambda: float(torch.rand((), generator=gen))) == []
    assert count_host_syncs(lambda: values[torch.tensor(3)]) == ["aten::_local_scalar_dense"]
    assert count_host_syncs(lambda: values[values > 4]) == ["aten::index"]
    assert count_host_syncs(lambda: values.sort()[0].take(torch.tensor(3))) == []
    with HostSyncCounter() as counter:
        values.sum().item()
    assert counter.ops == ["aten::_local_scalar_dense"]


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_our_step_makes_no_host_syncs(tiny_raw, efficient):
    """No .item(), no data-dependent shapes: the percentile stays on the device (cutmix draws
    come from a CPU generator and are host data). The reference keeps the original's syncs."""
    state, batches = _state_past_alias_epoch(tiny_raw, efficient=efficient, mix_prob=1.0)
    ref = copy.deepcopy(state)
    assert count_host_syncs(lambda: _run(state, gta.train_step, batches[1])) == []
    ref_syncs = count_host_syncs(lambda: _run(ref, reference_step, batches[1]))
    assert "aten::index" in ref_syncs and ref_syncs.count("aten::_local_scalar_dense") == 2


@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_forward_units_of_each_step(tiny_raw):
    """B labelled = B unlabelled: 3 units for supervised, 15 for the original structure, 7 for
    the efficient mode (a forward of B images is 1 unit, its backward 2)."""
    state, batches = _state_past_alias_epoch(tiny_raw)
    b = batches[1].x_l.shape[0]
    cases = {
        "supervised": (supervised.train_step, {}, 3.0),
        "gta": (gta.train_step, {}, 15.0),
        "gta_efficient": (gta.train_step, {"efficient": True}, 7.0),
        "reference": (reference_step, {}, 15.0),
    }
    for name, (step, semi, expected) in cases.items():
        s = copy.deepcopy(state)
        s.cfg = config_from_dict({**s.cfg.to_dict(), "semi": {**s.cfg.to_dict()["semi"], **semi}})
        units = count_units(s, lambda s=s, step=step: _run(s, step, batches[1]), b)
        assert units["total"] == expected, (name, units)
    assert units == {"teacher": 3.0, "assistant": 6.0, "student": 6.0, "total": 15.0}


@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_bench_cli_writes_the_report(tiny_raw, tmp_path, capsys):
    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump({"run": tiny_raw}))
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--config",
        str(cfg_path),
        "--size",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"supervised", "gta", "gta_efficient", "reference"}
    totals = {k: v["units"]["total"] for k, v in report["variants"].items()}
    assert totals == {"supervised": 3.0, "gta": 15.0, "gta_efficient": 7.0, "reference": 15.0}
    for row in report["variants"].values():
        assert row["ms_median"] > 0 and row["ms_p90"] >= row["ms_median"]
        assert row["images_per_s"] > 0 and row["state_mb"] > 0
        assert {"step_peak_mb", "host_syncs_per_step", "images_per_step"} <= set(row)
    ratios = report["ratios"]
    assert ratios["efficient_over_supervised"]["target"] == 2.5
    assert ratios["faithful_over_reference"]["target"] == 1.0
    assert ratios["gta_over_supervised"]["units_ratio"] == pytest.approx(5.0)
    for r in ratios.values():
        assert r["value"] > 0 and r["ratio_of_medians"] > 0
        assert r["pass"] is (None if r["target"] is None else r["value"] <= r["target"])
    assert [r["window_batch"] for r in report["eval_sliding"]] == [1, 8]
    assert all(r["windows_per_s"] > 0 for r in report["eval_sliding"])
    assert report["settings"]["size"] == 32 and report["memory_method"]
    printed = capsys.readouterr().out
    assert "faithful_over_reference" in printed and ("PASS" in printed or "MISS" in printed)


# ---- GPU fast paths (skipped without CUDA) ----------------------------------------------------


def _gpu_state(raw, **train):
    raw = {**raw, "train": {**raw["train"], **train}}
    cfg = config_from_dict(raw)
    data = make_train_data(cfg.data, 2, 2, 0)
    state = build_state(cfg, torch.device("cuda"), data.iters_per_epoch)
    state.iteration = state.warmup_iters + state.iters_per_epoch
    batch = next(iter(data.epoch(0)))
    return state, type(batch)(*(t.cuda() if t is not None else None for t in batch))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_gives_finite_losses(tiny_raw, amp):
    """fp16 overflows at the GradScaler's first scales and those steps are skipped; a skipped
    first step must not leave garbage in the optimisers (tests/test_amp.py pins why on CPU)."""
    state, batch = _gpu_state(tiny_raw, amp=amp)
    assert ("student" in state.scalers) == (amp == "fp16")
    for _ in range(3):
        out = _run(state, gta.train_step, batch)
        assert all(torch.isfinite(v) for v in out.losses.values())
    assert all(torch.isfinite(p).all() for p in state.student.parameters())


@pytest.mark.gpu
def test_channels_last_step(tiny_raw):
    state, batch = _gpu_state(tiny_raw, channels_last=True)
    conv = state.student.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    out = _run(state, gta.train_step, batch)
    assert all(torch.isfinite(v) for v in out.losses.values())


@pytest.mark.gpu
def test_compile_smoke(tiny_raw):
    state, batch = _gpu_state(tiny_raw, compile=True)
    keys = set(state.teacher.state_dict())
    out = _run(state, gta.train_step, batch)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert set(state.teacher.state_dict()) == keys  # compiled in place: checkpoints unchanged


@pytest.mark.gpu
def test_gpu_step_makes_no_host_syncs(tiny_raw):
    state, batch = _gpu_state(tiny_raw)
    _run(state, gta.train_step, batch)
    assert count_host_syncs(lambda: _run(state, gta.train_step, batch)) == []


@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_bench_loop_times_real_training_loops_beside_the_step(tiny_raw, tmp_path, capsys):
    import csv

    cfg_path = tmp_path / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump({"run": tiny_raw}))
    out = tmp_path / "loop.json"
    argv = ["bench-loop", "--config", str(cfg_path), "--size", "32", "--batch", "2", "--iters",
            "2", "--rounds", "2", "--n-train", "40", "--device", "cpu", "--threads", "1",
            "--step-steps", "1", "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"supervised", "gta", "gta_efficient"}
    for row in report["variants"].values():
        assert row["iterations"] == [2, 2]  # real runs of --iters iterations, --rounds times
        assert row["loop_s"] > 0 and row["call_s"] > row["loop_s"] and row["data_ms_per_iter"] > 0
    sup, eff = report["variants"]["supervised"], report["variants"]["gta_efficient"]
    per_round = sorted(a / b for a, b in zip(eff["loop_s_all"], sup["loop_s_all"], strict=True))
    assert report["loop_ratios"]["efficient_over_supervised"] == pytest.approx(
        sum(per_round) / 2)  # the median of two rounds  # fmt: skip
    assert set(report["step_ratios"]) == {"efficient_over_supervised", "gta_over_supervised"}
    assert all(v > 0 for v in report["step_ratios"].values())
    assert (tmp_path / "work" / "data" / "embedded-32px-40-11c" / "train.txt").is_file()
    assert not any((tmp_path / "work" / "runs").iterdir())  # run folders are removed
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["variant"] for r in rows] == [
        "supervised", "gta", "gta_efficient", "ratio efficient_over_supervised",
        "ratio gta_over_supervised"]  # fmt: skip
    printed = capsys.readouterr().out
    assert "efficient_over_supervised" in printed and "loop / step" in printed


def test_bench_loop_dataset_fits_a_config_with_more_classes_than_digits(tmp_path):
    """VOC's 21 classes on 10 digit classes: the dataset lists 21 names, so the config loads."""
    from dataclasses import replace

    from gtaseg.bench.loop import prepare_dataset
    from gtaseg.config import DataConfig
    from gtaseg.data.formats import list_samples

    root, split = prepare_dataset(tmp_path, 32, 20, 21)
    names = (root / "classes.txt").read_text().split()
    assert len(names) == 21 and names[10] == "digit_9" and names[11] == "unused_11"
    cfg = replace(DataConfig(), format="folder", root=str(root), num_classes=21)
    assert len(list_samples(cfg, "train")) == 20
    assert len((split / "labeled.txt").read_text().split()) == 1  # 1/16 of 20, at least one
    assert prepare_dataset(tmp_path, 32, 20, 21) == (root, split)  # written once, then reused
