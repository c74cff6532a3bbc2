"""Shared fixtures: the project's runtime settings, a tiny embedded dataset, a tiny run config."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from data_fixtures import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def _load_env_defaults() -> None:
    """The same settings scripts/run.sh exports (e.g. Prefect's server start-up timeout)."""
    for line in (ROOT / ".env.defaults").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            os.environ.setdefault(key.strip(), value.strip())


def _share_the_cores_between_workers() -> int:
    """Under pytest-xdist (`-n N`), each worker and each process it starts gets its share of
    the cores (intra-op threads past a core each run ~10x slower, see `one_torch_thread`), and
    its own Prefect home, so the temporary local API servers of two workers never share one
    database. Returns the torch threads for this process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = os.cpu_count() or 1
    if workers <= 1:
        return min(2, cores)
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    home = Path(tempfile.gettempdir()) / f"gtaseg-tests-prefect-{os.getpid()}-{worker}"
    os.environ["PREFECT_HOME"] = str(home)
    return threads


_load_env_defaults()
torch.set_num_threads(_share_the_cores_between_workers())


def pytest_sessionfinish(session, exitstatus):
    """A worker's own Prefect home (see above) goes with the worker."""
    home = os.environ.get("PREFECT_HOME", "")
    if Path(home).name.startswith("gtaseg-tests-prefect-"):
        shutil.rmtree(home, ignore_errors=True)


# The longest modules, longest first (benchmarks/results/test_durations_full.txt): whole files go
# to the workers in collection order (scripts/run.sh: --dist loadfile --no-loadscope-reorder), so
# these start at once and the short ones fill in around them, instead of test_scaleout.py (a
# chain of sweeps, ~6 minutes) starting last and running alone at the end.
LONGEST_FIRST = (
    "test_scaleout.py",
    "test_profiles_real_size.py",
    "test_pipeline.py",
    "test_bench.py",
    "test_pipeline_data.py",
    "test_reliability.py",
)


def _start_order(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_order)  # stable: within a module and among the rest, file order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present (CI never has one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_torch_thread():
    """Two intra-op threads on a busy 2-core CI machine run ~10x slower than one
    (oversubscription); modules that train in-process use this."""
    with torch_threads(1):
        yield


@pytest.fixture
def two_torch_threads():
    """Golden values recorded with 2 intra-op threads: a CPU kernel's result can depend on how
    its work is split between threads, and a few training steps carry such a difference from
    the last bits to the fourth decimal. Under pytest-xdist a worker otherwise runs with 1."""
    with torch_threads(2):
        yield


@pytest.fixture(autouse=True)
def restore_mlflow_uri(monkeypatch) -> None:
    """Undo what a tracked run does to mlflow's process-wide state (log_model's URI switch leaves
    the URI pinned and MLFLOW_TRACKING_URI set), so later tests see what they expect.
    Without mlflow (a GPU box running only the library's tests) there is nothing to restore."""
    try:
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    if (uri := os.environ.get("MLFLOW_TRACKING_URI")) is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 24-train / 6-val embedded dataset of 32x32 scenes, with a 1/4 split."""
    from gtaseg.data.embedded import make_embedded

    root = tmp_path_factory.mktemp("emb") / "embedded"
    make_embedded(root, n_train=24, n_val=6, size=32, seed=0)
    return root


@pytest.fixture
def tiny_raw(tiny_dataset, tmp_path) -> dict:
    """A raw config dict for a seconds-long CPU run on `tiny_dataset` (split written)."""
    from gtaseg.data.splits import make_split, write_split

    ids = sorted((tiny_dataset / "train.txt").read_text().split())
    labeled, unlabeled = make_split(ids, 0.25, 0)
    write_split(tmp_path / "split", labeled, unlabeled)
    raw = {section: dict(values) for section, values in TINY_RUN.items()}
    raw["data"].update(root=str(tiny_dataset), split_dir=str(tmp_path / "split"))
    raw["model"]["encoder"] = "resnet18"
    return raw
