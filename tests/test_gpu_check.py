"""A job given GPUs (GTASEG_REQUIRE_GPUS, set by the Kubernetes job template) that sees fewer stops
at once with one line saying what torch found, instead of training on the CPU.

The stop is tested for real on whatever machine runs the tests: asking for one GPU more than
torch sees (one, on a machine without CUDA).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gtaseg.training.distributed import (
    REQUIRE_GPUS_ENV,
    GpuError,
    check_gpus,
    init_from_env,
    required_gpus,
)

ROOT = Path(__file__).resolve().parents[1]


def _visible() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_required_gpus_reads_the_jobs_count_unless_the_device_is_cpu(monkeypatch) -> None:
    monkeypatch.delenv(REQUIRE_GPUS_ENV, raising=False)
    assert required_gpus("auto") == 0  # a laptop or CI run: auto may pick the CPU
    assert (required_gpus("cuda"), required_gpus("cuda:1")) == (1, 2)
    monkeypatch.setenv(REQUIRE_GPUS_ENV, "4")
    assert (required_gpus("auto"), required_gpus("cuda:0"), required_gpus("cpu")) == (4, 4, 0)
    monkeypatch.setenv(REQUIRE_GPUS_ENV, "")
    assert required_gpus("auto") == 0
    monkeypatch.setenv(REQUIRE_GPUS_ENV, "four")
    with pytest.raises(GpuError, match=f"{REQUIRE_GPUS_ENV}: expected a whole number"):
        required_gpus("auto")


def test_a_job_short_of_gpus_stops_before_joining_or_training(monkeypatch) -> None:
    need = _visible() + 1
    monkeypatch.setenv(REQUIRE_GPUS_ENV, str(need))
    monkeypatch.setenv("WORLD_SIZE", "2")  # stops before waiting for a process group
    with pytest.raises(GpuError) as caught:
        init_from_env("auto")
    message = str(caught.value)
    assert f"expected {need} GPU(s), found {_visible()}" in message
    assert "\n" not in message and "train.device=cpu" in message
    check_gpus("cpu")  # the CPU chosen on purpose is not a shortage


def test_without_a_requirement_auto_still_falls_back_to_the_cpu(monkeypatch) -> None:
    monkeypatch.delenv(REQUIRE_GPUS_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, device = init_from_env("auto")
    assert device.type == ("cuda" if _visible() else "cpu")


@pytest.mark.slow  # over 2 s: the fast tier stays short
def test_gtaseg_train_short_of_gpus_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """The command a job runs: exit 2, one error line, no traceback, nothing written."""
    need = _visible() + 1
    env = {**os.environ, REQUIRE_GPUS_ENV: str(need), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "gtaseg.cli", "train", "--config", "params.yaml", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gtaseg train: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and f"expected {need} GPU(s), found {_visible()}" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_job_given_the_gpus_it_sees_starts_on_its_gpu(monkeypatch) -> None:
    monkeypatch.setenv(REQUIRE_GPUS_ENV, str(_visible()))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, device = init_from_env("auto")
    assert device == torch.device("cuda", 0)
