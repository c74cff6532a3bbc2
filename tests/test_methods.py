"""Invariants of the three methods' steps on a tiny DeepLabV3+ (CPU, seconds)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from gtaseg import IGNORE_INDEX
from gtaseg.config import ConfigError, config_from_dict
from gtaseg.data.loaders import make_train_data
from gtaseg.methods import get_step, gta
from gtaseg.methods.common import kept_percent
from gtaseg.methods.state import build_state, set_lrs
from gtaseg.model.build import classifier_modules
from gtaseg.training.ema import ema_update


def _state(raw, **semi):
    raw = {**raw, "semi": {**raw["semi"], **semi}}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    data = make_train_data(cfg.data, 2, 2, 0, need_unlabeled=cfg.train.method != "supervised")
    state = build_state(cfg, torch.device("cpu"), data.iters_per_epoch)
    return state, list(data.epoch(0))


def _after_warmup(state):
    state.iteration = state.warmup_iters
    return state


def _ids(modules):
    return {id(p) for m in modules for p in m.parameters()}


def test_transfer_excludes_exactly_the_classifier(tiny_raw):
    state, _ = _state(tiny_raw)
    student, assistant = state.student, state.assistant
    head = classifier_modules(student, "all_but_classifier")
    assert head == [student.decoder.block2, student.segmentation_head]
    with torch.no_grad():
        for p in assistant.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in student.named_parameters()}
    ema_update(student, assistant, decay=0.0, exclude=head)
    head_ids = _ids(head)
    for name, p in student.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (id(p) not in head_ids), name
    encoder_scope = classifier_modules(student, "encoder")
    assert _ids(encoder_scope) | _ids([student.encoder]) == {id(p) for p in student.parameters()}
    assert not _ids(encoder_scope) & _ids([student.encoder])


def test_teacher_gets_no_gradients_and_follows_the_student(tiny_raw):
    state, batches = _state(tiny_raw)
    _after_warmup(state)
    before = [p.clone() for p in state.teacher.parameters()]
    set_lrs(state)
    out = get_step("gta")(state, batches[0])
    assert all(not p.requires_grad and p.grad is None for p in state.teacher.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(before, state.teacher.parameters(), strict=True)
    )
    assert set(out.losses) == {"loss_sup", "loss_unsup", "kept_frac"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.pseudo_BHW.shape == batches[0].y_u.shape


def _head_params(net):
    return [p for m in classifier_modules(net, "all_but_classifier") for p in m.parameters()]


@pytest.mark.parametrize(
    "copy_mode, tie, tied",
    [
        ("alias", "auto", True),  # the original: tied from the alias epoch to the end
        ("alias", "off", False),
        ("once", "auto", False),
        ("once", "lasting", True),
    ],
)
@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_classifier_tie_lasts_past_the_alias_epoch(tiny_raw, copy_mode, tie, tied):
    """In the original, the student's and the assistant's classifier are one tensor from the
    alias epoch on: after N steps past it they are equal, and each step moves them by both the
    assistant's and the student's update (the rest of the two networks differs)."""
    state, batches = _state(tiny_raw, warmup_copy=copy_mode, classifier_tie=tie)
    _after_warmup(state)
    steps = state.iters_per_epoch + 3  # the alias epoch and three steps past it
    for k in range(steps):
        set_lrs(state)
        get_step("gta")(state, batches[k % len(batches)])
        state.iteration += 1
    s_head, a_head = _head_params(state.student), _head_params(state.assistant)
    same = all(torch.equal(a, b) for a, b in zip(s_head, a_head, strict=True))
    assert same == tied
    body = zip(
        state.student.encoder.parameters(), state.assistant.encoder.parameters(), strict=True
    )
    assert not all(torch.equal(a, b) for a, b in body)
    if tied:  # the next step moves the shared classifier by both updates, not the student's alone
        before = [p.detach().clone() for p in s_head]
        set_lrs(state)
        get_step("gta")(state, batches[0])
        moved = [a.detach() - b for a, b in zip(s_head, before, strict=True)]
        assert any(float(m.abs().max()) > 0 for m in moved)
        assert all(torch.equal(a, b) for a, b in zip(s_head, a_head, strict=True))


def _count_forwards(state):
    seen = {"student": [], "assistant": [], "teacher": []}
    for role in seen:
        getattr(state, role).register_forward_pre_hook(
            lambda m, args, role=role: seen[role].append(args[0].shape[0])
        )
    return seen


@pytest.mark.parametrize(
    "efficient,expected",
    [
        (False, {"teacher": [2, 4], "assistant": [4], "student": [4]}),  # the original's passes
        (True, {"teacher": [2], "assistant": [2], "student": [2]}),  # only what the losses need
    ],
)
@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_forward_passes_per_step(tiny_raw, efficient, expected):
    state, batches = _state(tiny_raw, efficient=efficient, warmup_copy="once")
    state.iteration = state.warmup_iters + state.iters_per_epoch  # past the alias epoch
    seen = _count_forwards(state)
    set_lrs(state)
    get_step("gta")(state, batches[0])
    assert seen == expected


def test_supervised_and_mean_teacher_steps(tiny_raw):
    for method in ("supervised", "mean_teacher"):
        raw = {**tiny_raw, "train": {**tiny_raw["train"], "method": method}}
        state, batches = _state(raw)
        assert (state.assistant is None) and ((state.teacher is None) == (method == "supervised"))
        _after_warmup(state)
        set_lrs(state)
        out = get_step(method)(state, batches[0])
        assert all(torch.isfinite(v) for v in out.losses.values())


def test_assistant_lr_stays_at_base_unless_poly(tiny_raw):
    for schedule, moves in (("constant", False), ("poly", True)):
        raw = {**tiny_raw, "optim": {**tiny_raw["optim"], "assistant_schedule": schedule}}
        state, _ = _state(raw)
        state.iteration = state.total_iters // 2
        set_lrs(state)
        lrs = [g["lr"] for g in state.opt_assistant.param_groups]
        assert (lrs != [0.01, 0.1]) == moves
        assert state.opt_student.param_groups[1]["lr"] == pytest.approx(
            10 * state.opt_student.param_groups[0]["lr"]
        )


@pytest.fixture
def deterministic_algorithms():
    """Deterministic kernels for one test, then the process's previous setting back."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _cutmix_from_scratch(x, y, conf, gen):
    """The original's cutmix (`generate_cutout_mask`, ratio 2): per image one box of half the
    area, inside which image i takes image (i + 1) mod B. The same draws from `gen` as the
    original's np.random.randint calls, in the same order."""
    b, _, h, w = x.shape
    keep = torch.ones(b, h, w, dtype=torch.bool)
    for i in range(b):
        box_w = int(torch.randint(int(w / 2) + 1, w, (1,), generator=gen))
        box_h = min(h, round(h * w / 2 / box_w))
        x0 = int(torch.randint(0, w - box_w + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, h - box_h + 1, (1,), generator=gen))
        keep[i, y0 : y0 + box_h, x0 : x0 + box_w] = False
    nxt = [(i + 1) % b for i in range(b)]
    return (torch.where(keep[:, None], x, x[nxt]), torch.where(keep, y, y[nxt]),
            torch.where(keep, conf, conf[nxt]))  # fmt: skip


def _cross_entropy_from_scratch(logits, target):
    """Per-pixel -log softmax at the target class; 0 where the target is IGNORE_INDEX."""
    ignored = target == IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=1)
    ce = -logp.gather(1, target.masked_fill(ignored, 0)[:, None])[:, 0]
    return ce.masked_fill(ignored, 0.0)


def _first_gta_step_from_scratch(cfg, nets, batch, rng_state, mix_state):
    """(loss_sup, loss_unsup) of GTA-Seg's first semi-supervised iteration in the faithful mode
    with the original code's tensor aliasing, recomputed from the paper's algorithm and the
    original's iteration with torch primitives only: no gtaseg function runs here.

    `nets` are copies of (student, assistant, teacher) before the step; at the first semi step
    the three networks share the student's parameters. The global RNG (dropout) and the mixing
    generator start from the states the step started from.
    """
    semi, optim = cfg.semi, cfg.optim
    student, assistant, teacher = nets
    torch.set_rng_state(rng_state)
    gen = torch.Generator()
    gen.set_state(mix_state)
    x_l, y_l, x_u = batch.x_l, batch.y_l, batch.x_u
    n_l = x_l.shape[0]
    # 1. the teacher (eval mode) pseudo-labels the unlabelled batch
    teacher.eval()
    with torch.no_grad():
        conf, pseudo = torch.softmax(teacher(x_u).float(), dim=1).max(dim=1)
    # 2. strong mixing with probability mix_prob
    if float(torch.rand((), generator=gen)) < semi.mix_prob:
        x_u, pseudo, conf = _cutmix_from_scratch(x_u, pseudo, conf, gen)
    # 3. the assistant sees [labelled; mixed unlabelled]; the loss's confidence comes from a
    #    second, train-mode teacher forward on the same batch (after the assistant's, as the
    #    original: dropout draws in this order)
    x_in = torch.cat([x_l, x_u])
    assistant.train()
    logits_u = assistant(x_in)[n_l:]
    teacher.train()
    with torch.no_grad():
        conf = torch.softmax(teacher(x_in)[n_l:].float(), dim=1).max(dim=1).values
    # 4. confidence-weighted loss over the most confident drop_percent% of pixels
    threshold = torch.quantile(conf.flatten(), 1 - semi.drop_percent / 100)  # linear, as numpy
    dropped = conf <= threshold
    target = pseudo.masked_fill(dropped, IGNORE_INDEX)
    conf = conf.masked_fill(dropped, 0.0)
    weight = (conf + 1) / (conf + 1).sum() * target.numel()  # * K * (N / K)
    loss_u = (weight * _cross_entropy_from_scratch(logits_u, target)).mean()
    # 5. the assistant's SGD step (first step: momentum buffer = gradient + weight decay term);
    #    its LR stays at the base value (encoder lr, decoder and heads lr * multiplier)
    params = [p for p in assistant.parameters() if p.requires_grad]
    grads = torch.autograd.grad(semi.loss_weight * loss_u, params, allow_unused=True)
    encoder = {id(p) for p in assistant.encoder.parameters()}
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                lr = optim.lr * (1.0 if id(p) in encoder else optim.head_lr_multiplier)
                p -= lr * (g + optim.weight_decay * p)
        # 6. aliasing: the student's parameters are the assistant's, so the transfer (decay 0 at
        #    t = 0) leaves them there
        for s, a in zip(student.parameters(), assistant.parameters(), strict=True):
            s.copy_(a)
    # 7. the student's supervised loss, its forward over [labelled; mixed unlabelled]
    student.train()
    logits_l = student(x_in)[:n_l]
    labelled = (y_l != IGNORE_INDEX).sum()
    loss_sup = _cross_entropy_from_scratch(logits_l, y_l).sum() / labelled
    return loss_sup.detach(), loss_u.detach()


@pytest.mark.usefixtures("deterministic_algorithms")
def test_first_gta_step_matches_a_from_scratch_computation(tiny_raw):
    state, batches = _state(tiny_raw)
    _after_warmup(state)
    nets = copy.deepcopy((state.student, state.assistant, state.teacher))
    rng_state, mix_state = torch.get_rng_state(), state.mix_gen.get_state()
    set_lrs(state)
    out = get_step("gta")(state, batches[0])

    loss_sup, loss_u = _first_gta_step_from_scratch(
        state.cfg, nets, batches[0], rng_state, mix_state
    )
    torch.testing.assert_close(out.losses["loss_unsup"], loss_u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_sup"], loss_sup, rtol=1e-5, atol=1e-6)


# Golden losses of the first three semi-supervised GTA steps (CPU, deterministic kernels), so a
# change to any of the step's numerics shows. Source: the first row is what the from-scratch
# computation above gives (to 1e-5); rows 2-3 were printed by this test's own loop (`got`) with
# torch 2.14.1 on CPU, so they pin the step as it is (momentum, the EMAs, the alias epoch's
# sharing) without proving those steps right. A change here means the numerics changed: check
# that it was intended, then update the numbers. Recorded with 2 torch threads (the test pins
# them): with 1, rows 2-3 differ from the third decimal.
GOLDEN = [[2.42739, 1.76572], [2.29918, 1.52007], [2.4374, 1.22891]]


@pytest.mark.usefixtures("deterministic_algorithms", "two_torch_threads")
@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_golden_losses(tiny_raw):
    state, batches = _state(tiny_raw)
    _after_warmup(state)
    got = []
    for batch in batches[:3]:
        set_lrs(state)
        out = get_step("gta")(state, batch)
        state.iteration += 1
        got.append([round(float(out.losses[k]), 5) for k in ("loss_sup", "loss_unsup")])
    assert [v for row in got for v in row] == pytest.approx(sum(GOLDEN, []), abs=1e-4), got


def _spy(monkeypatch, module, name, seen):
    """Wrap `module.name` so each call's positional arguments are appended to `seen`."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("method", ["gta", "mean_teacher"])
@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.slow  # over 10 s: the fast tier stays short
def test_oracle_labels_feed_the_true_masks_into_the_step(tiny_raw, monkeypatch, method, oracle):
    """semi.oracle_labels: the unlabelled loss learns from the unlabelled images' true masks;
    without it, from the teacher's pseudo-labels. The step returns the teacher's pseudo-labels
    either way (what the loop scores as pseudo_miou)."""
    raw = {**tiny_raw, "train": {**tiny_raw["train"], "method": method}}
    state, batches = _state(raw, oracle_labels=oracle, mix="none")
    _after_warmup(state)
    seen = []
    module = importlib.import_module(f"gtaseg.methods.{method}")
    _spy(monkeypatch, module, "conf_weighted_pseudo_loss", seen)
    batch = batches[0]
    set_lrs(state)
    out = get_step(method)(state, batch)
    assert not torch.equal(out.pseudo_BHW, batch.y_u)  # the two sources differ on this batch
    assert torch.equal(seen[0][1], batch.y_u if oracle else out.pseudo_BHW)


def test_oracle_labels_without_masks_is_a_clear_error(tiny_raw):
    state, batches = _state(tiny_raw, oracle_labels=True)
    _after_warmup(state)
    batch = batches[0]._replace(y_u=torch.full_like(batches[0].y_u, IGNORE_INDEX))
    set_lrs(state)
    with pytest.raises(ConfigError, match="semi.oracle_labels: expected true masks"):
        get_step("gta")(state, batch)


def test_horizons_set_both_decays_on_the_runs_clock(tiny_raw, monkeypatch):
    """With semi.transfer_horizon and semi.ema_horizon (fractions of the semi-supervised
    iterations N) the transfer and the teacher EMA use 1 - 1/(h N), not the literal decays."""
    state, batches = _state(
        tiny_raw, warmup_copy="once", transfer_ramp=False, transfer_horizon=0.5, ema_horizon=1.0
    )
    n = state.semi_iters
    assert n == state.total_iters - state.warmup_iters and n >= 3
    state.iteration = state.total_iters - 1  # t = N - 1: the teacher's ramp is past its cap
    seen = []
    _spy(monkeypatch, gta, "ema_update", seen)
    set_lrs(state)
    get_step("gta")(state, batches[0])
    transfer, teacher = (args[2] for args in seen)
    assert transfer == pytest.approx(1 - 1 / (0.5 * n))
    assert teacher == pytest.approx(1 - 1 / n)


def test_drop_anneal_keeps_more_pixels_over_the_run(tiny_raw):
    state, _ = _state(tiny_raw, drop_percent=80.0, drop_anneal=True)
    fixed, _ = _state(tiny_raw, drop_percent=80.0)
    for s in (state, fixed):
        s.iteration = s.warmup_iters
    assert kept_percent(state) == kept_percent(fixed) == 80.0
    state.iteration = fixed.iteration = state.warmup_iters + state.semi_iters // 2
    half = 80.0 + 20.0 * (state.semi_iters // 2) / state.semi_iters
    assert kept_percent(state) == pytest.approx(half) and kept_percent(fixed) == 80.0
    state.iteration = state.total_iters
    assert kept_percent(state) == 100.0


def test_the_pipeline_refuses_the_oracle_diagnostic(tmp_path) -> None:
    """semi.oracle_labels trains on the masks the split hides: quality.py's diagnostic only."""
    from pathlib import Path

    import yaml

    from pipelines.params import load_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["run"]["semi"]["oracle_labels"] = True
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="run.semi.oracle_labels: true trains on the true masks"):
        load_params(path)
    params["run"]["semi"]["oracle_labels"] = False
    path.write_text(yaml.safe_dump(params))
    assert load_params(path).run.semi.oracle_labels is False
