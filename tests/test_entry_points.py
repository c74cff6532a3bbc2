"""Every entry point answers a missing or wrong argument with argparse's usage line and exit
status 2, before any work and without a traceback: `gtaseg`, `python -m pipelines.stages`,
`python -m pipelines.flows` and `python -m pipelines.cluster.storage`."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module, argv, what the error line says)
USAGE_ERRORS = {
    "stages: no stage": ("pipelines.stages", [], "required: STAGE"),
    "stages: train without --ratio": ("pipelines.stages", ["train"], "required: --ratio, --method"),
    "stages: train without --method": (
        "pipelines.stages",
        ["train", "--ratio", "1_16"],
        "required: --method",
    ),
    "stages: unknown method": (
        "pipelines.stages",
        ["train", "--ratio", "1_16", "--method", "fixmatch"],
        "argument --method: invalid choice: 'fixmatch'",
    ),
    "stages: split without --ratio": ("pipelines.stages", ["split"], "required: --ratio"),
    "stages: seed not a number": (
        "pipelines.stages",
        ["split", "--ratio", "1_4", "--seed", "x"],
        "argument --seed: invalid int value: 'x'",
    ),
    "stages: option of another stage": (
        "pipelines.stages",
        ["compare", "--ratio", "1_4"],
        "unrecognized arguments: --ratio",
    ),
    "flows: no flow": ("pipelines.flows", [], "required: flow"),
    "flows: unknown method": (
        "pipelines.flows",
        ["train", "--method", "fixmatch"],
        "argument --method: invalid choice: 'fixmatch'",
    ),
    "flows: seed not a number": (
        "pipelines.flows",
        ["train", "--seed", "1.5"],
        "argument --seed: invalid int value: '1.5'",
    ),
    "flows: deployment without its flow": (
        "pipelines.flows",
        ["sweep", "--train-deployment", "train-gpu"],
        "expected FLOW/DEPLOYMENT such as gtaseg-train/train-gpu, got 'train-gpu'",
    ),
    "gtaseg: no command": ("gtaseg.cli", [], "required: COMMAND"),
    "gtaseg: train without --out": ("gtaseg.cli", ["train"], "required: --out"),
    "gtaseg: unknown device": (
        "gtaseg.cli",
        ["evaluate", "--checkpoint", "best.pt", "--device", "gpu0"],
        "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu0'",
    ),
    "gtaseg: overlay opacity above 1": (
        "gtaseg.cli",
        ["predict", "--model", "m", "--images", "i", "--out", "o", "--alpha", "3"],
        "argument --alpha: expected a number from 0 to 1, got '3'",
    ),
    "gtaseg bench: unknown device": (
        "gtaseg.cli",
        ["bench", "--device", "bogus"],
        "argument --device: expected auto, cpu, cuda or cuda:N, got 'bogus'",
    ),
    "gtaseg bench-loop: unknown device": (
        "gtaseg.cli",
        ["bench-loop", "--device", "cuda:x"],
        "argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'",
    ),
    "storage: publish without a path": (
        "pipelines.cluster.storage",
        ["publish"],
        "required: path",
    ),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_bad_argument_ends_in_the_usage_line(case: str, tmp_path: Path, monkeypatch, capsys):
    module, argv, message = USAGE_ERRORS[case]
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    main = importlib.import_module(module).main
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_:
        main(argv)

    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("usage: "), err
    last = err.splitlines()[-1]
    assert ": error: " in last and message in last, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--ratio", "one_third"], "label amount 'one_third': expected a ratio"),
        (
            ["train", "--set", "train.epoch=2"],
            "override 'train.epoch=2': unknown key 'train.epoch'",
        ),
        (["train", "--params", "missing.yaml"], "missing.yaml not found"),
    ],
)
def test_flows_check_their_inputs_before_a_flow_run_starts(
    argv: list[str], message: str, tmp_path: Path, monkeypatch, capsys
):
    """Bad input to a flow is one line and exit 2, not a failed flow run's logged traceback."""
    from pipelines import flows

    def no_flow(*args, **kwargs):
        raise AssertionError("a flow started with bad input")

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows, "train_flow", no_flow)
    capsys.readouterr()

    assert flows.main(argv) == 2

    err = capsys.readouterr().err
    assert err.startswith("pipelines.flows train: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_bad_device_in_the_config_names_the_key():
    from gtaseg.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"train\.device: expected auto, cpu, cuda or cuda:N"):
        config_from_dict({"train": {"device": "gpu"}})
    assert config_from_dict({"train": {"device": "cuda:1"}}).train.device == "cuda:1"


def test_a_stage_without_its_arguments_in_a_real_process(tmp_path: Path):
    """The issue's case: `python -m pipelines.stages train` ended in a TypeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.stages", "train"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("usage: python -m pipelines.stages train"), done.stderr
    assert "Traceback" not in done.stderr
