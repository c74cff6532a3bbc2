"""Where a pipeline training stage spends the seconds beyond its training loop.

Runs the demo's train stage the way DVC runs it, in a fresh process, and times its phases:

    python -m pipelines.stages train --ratio 1_16 --method gta --seed 0 --set train.max_iters=N
    python -m pipelines.flows train ...   (the same stage as a Prefect flow run, as a sweep's
                                           cell runs, against a local `prefect server` started
                                           beforehand on loopback)

The child process imports the heavy packages one by one (prefect for a flow run, with the
collector on as `pipelines.flows` imports it; then torch, smp, mlflow with it off, as the stage
imports them) and times each, then runs the stage's own `main` with timers wrapped around the
functions a stage passes through (MLflow run set-up, data set-up, network build, the loop,
evaluations, checkpoints, model export, artifact and model logging, the final evaluation and
plots, closing the run), and counts the garbage collector's time. Wrappers add microseconds;
nothing is sampled. Interpreter start-up is the parent's wall time of the child less the child's
own. Also timed: process start and `--help` of the entry points, and importing torch, smp and
mlflow with the garbage collector on and off (medians of 3).

Set-up, not timed: a work folder with a copy of params.yaml (pretraining cut to --pretrain-epochs,
which only changes the encoder's quality), its dataset, split and pretrained encoder, and the
MLflow store the pretraining creates there, as for every stage after a pipeline's first.

    python benchmarks/profile_stage.py                       # 120 iterations, both launchers
    python benchmarks/profile_stage.py --iters 20 --via stages --out /tmp/profile.md
    python benchmarks/profile_stage.py --via stages --log-models every_run \
        --out benchmarks/results/profile_stage_every_run.md  # with every run's MLflow model

Writes a markdown table (--out, default benchmarks/results/profile_stage.md) and the JSON beside.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before any import below: the child's own clock starts here

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "segmentation_models_pytorch", "mlflow"]
STARTUP = {
    "python -c pass": ["-c", "pass"],
    "python -c 'import torch'": ["-c", "import torch"],
    "gtaseg --help": ["-m", "gtaseg.cli", "--help"],
    "gtaseg train --help": ["-m", "gtaseg.cli", "train", "--help"],
    "python -m pipelines.stages --help": ["-m", "pipelines.stages", "--help"],
    "python -m pipelines.flows --help": ["-m", "pipelines.flows", "--help"],
}
LOOP = "training loop (its wall_time_s)"
OVERLAP = "MLflow: log metrics (mostly inside the loop's time)"
# (module, attribute, label): wrapped in the child; a label nests under the wrapped call it runs in
WRAPPED = [
    ("pipelines.stages", "import_without_gc", "import the stage's other modules (MLflow's store)"),
    ("pipelines.stages", "train", "stage work (pipelines.stages.train)"),
    ("pipelines.tracking_run", "sweep_parent_or_none", "MLflow: find the sweep's parent run"),
    ("gtaseg.tracking.mlflow_tracker:MlflowTracker", "__init__", "MLflow: open the run"),
    ("gtaseg.tracking.mlflow_tracker:MlflowTracker", "log_params", "MLflow: log params"),
    ("gtaseg.tracking.mlflow_tracker:MlflowTracker", "log_metrics", OVERLAP),
    ("gtaseg.tracking.mlflow_tracker:MlflowTracker", "log_artifact", "MLflow: log artifacts"),
    ("gtaseg.tracking.mlflow_tracker:MlflowTracker", "log_model", "MLflow: log_model"),
    ("gtaseg.tracking.mlflow_tracker:MlflowTracker", "close", "MLflow: close the run"),
    ("pipelines.tracking_run", "train", "gtaseg.training.loop.train"),
    ("gtaseg.training.loop", "make_train_data", "data set-up (list, check, cache)"),
    ("gtaseg.training.loop", "check_samples", "val files check"),
    ("gtaseg.training.loop", "build_state", "networks and optimisers"),
    ("gtaseg.training.loop", "evaluate_epoch", "evaluations during training"),
    (
        "gtaseg.training.loop",
        "save_state",
        "checkpoints",
    ),  # the loop's own; the next: after evaluations
    ("gtaseg.training.epoch_end", "save_state", "checkpoints"),
    ("gtaseg.training.epoch_end", "_export_reported", "model export (save_pretrained)"),
    ("pipelines.tracking_run", "_log_outputs", "after training: artifacts, model, plots"),
    ("pipelines.tracking_run", "load_exported", "load the exported model"),
    ("pipelines.tracking_run", "make_val_data", "val data"),
    ("pipelines.tracking_run", "evaluate", "final evaluation"),
    ("pipelines.tracking_run", "confusion_plot", "confusion plot"),
    ("pipelines.tracking_run", "predict_val_overlays", "val overlays"),
]


class PhaseTimer:
    """Seconds and calls per call path of wrapped functions (one path stack per thread)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, ...], list[float]] = {}
        self._local = threading.local()

    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def add(self, path: tuple[str, ...], seconds: float) -> None:
        record = self.records.setdefault(path, [0.0, 0])
        record[0] += seconds
        record[1] += 1

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            stack = self._stack()
            stack.append(label)
            path, start = tuple(stack), time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                self.add(path, time.perf_counter() - start)
                stack.pop()
            if label == "gtaseg.training.loop.train":  # the loop's own time, from the run's summary
                self.add((*path, LOOP), float(result["wall_time_s"]))
            return result

        setattr(owner, attr, timed)


def _resolve(owner: str) -> object:
    """'pkg.module' -> the module; 'pkg.module:Class' -> the class."""
    module, _, name = owner.partition(":")
    found = importlib.import_module(module)
    return getattr(found, name) if name else found


class GcTimer:
    """Seconds the cyclic garbage collector runs, counted inside whatever phase it interrupts."""

    def __init__(self) -> None:
        self.seconds, self.collections, self.full, self._start = 0.0, 0, 0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.collections += 1
        self.full += info["generation"] == 2

    def summary(self) -> dict:
        return {"s": self.seconds, "collections": self.collections, "full": self.full}


def _stamp_exit(path: Path) -> None:
    path.write_text(repr(time.perf_counter()))


def child(via: str, stage_args: list[str], phases_out: Path) -> int:
    """Inside the measured process: timed imports, wrappers, then the stage's own main."""
    # Registered first, so it runs after every other exit handler (mlflow's, prefect's, ...).
    atexit.register(_stamp_exit, phases_out.with_suffix(".exit"))
    from gtaseg.startup import imports_without_gc

    timer, collector = PhaseTimer(), GcTimer()
    imports = {}
    if via == "flows":  # imported with pipelines.flows itself, the collector on
        start = time.perf_counter()
        importlib.import_module("prefect")
        imports["import prefect"] = time.perf_counter() - start
    # As the stage imports what it uses (pipelines.stages.import_stage_modules, which then finds
    # them all imported): with the collector off, then everything frozen.
    with imports_without_gc():
        for name in HEAVY:
            start = time.perf_counter()
            importlib.import_module(name)
            imports[f"import {name}"] = time.perf_counter() - start
        start = time.perf_counter()
        importlib.import_module("mlflow.store.tracking.sqlalchemy_store")
        imports["import MLflow's sqlite store"] = time.perf_counter() - start
        start = time.perf_counter()
        entry = importlib.import_module(f"pipelines.{via}")
        for module in (
            "pipelines.tracking_run",
            "gtaseg.training.loop",
            "gtaseg.tracking.mlflow_tracker",
        ):
            importlib.import_module(module)
        importlib.import_module("matplotlib.figure")
        imports["import pipelines, gtaseg, matplotlib.figure"] = time.perf_counter() - start
    for owner, attr, label in WRAPPED:
        timer.wrap(_resolve(owner), attr, label)
    if via == "flows":
        timer.wrap(entry, "main", "Prefect flow run (pipelines.flows.main)")
    code = entry.main(stage_args)
    gc.freeze()  # as the entry's `run()` does before it exits
    result = {
        "imports": imports,
        "child_start": T0,  # CLOCK_MONOTONIC on Linux: comparable with the parent's clock
        "child_s": time.perf_counter() - T0,
        "phases": [{"path": list(p), "s": s, "calls": n} for p, (s, n) in timer.records.items()],
        "gc": collector.summary(),
    }
    phases_out.write_text(json.dumps(result, indent=2) + "\n")
    return code


# ---- the parent: set-up, start-up timings, measured stage runs, report ------------------------


def _env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The demo's environment: .env.defaults (unless set), this checkout first on the path."""
    env = dict(os.environ)
    for line in (REPO / ".env.defaults").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            env.setdefault(key.strip(), value.strip())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PREFECT_HOME"] = str(work / ".prefect")
    env.pop("GTASEG_PROGRESS", None)
    return {**env, **(extra or {})}


@contextlib.contextmanager
def prefect_server(home: Path):
    """A `prefect server start` subprocess on a free loopback port; yields its API URL."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with (home / "server.log").open("w") as log:
        server = subprocess.Popen(
            [*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"prefect server did not start; see {home / 'server.log'}"
                    ) from None
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def set_up(work: Path, pretrain_epochs: int, ratio: str, log_models: str) -> None:
    """params.yaml copy, dataset, split and pretrained encoder in `work` (skipped when present)."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    prep, pretrained = next(iter(params["data_prep"])), next(iter(params["pretrain"]))
    params["pretrain"][pretrained]["epochs"] = pretrain_epochs
    params["tracking"]["log_models"] = log_models
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = [
        ["prepare", "--name", prep],
        ["split", "--ratio", ratio, "--seed", "0"],
        ["pretrain", "--name", pretrained],
    ]
    done = [
        work / "data" / prep,
        work / f"data/splits/{ratio}/seed0",
        work / "models" / pretrained / "encoder.pth",
    ]
    for args, output in zip(steps, done, strict=True):
        if not output.exists():
            print(f"[profile] set-up: pipelines.stages {' '.join(args)}", flush=True)
            cmd = [sys.executable, "-m", "pipelines.stages", *args]
            subprocess.run(cmd, cwd=work, env=_env(work), check=True, stdout=subprocess.DEVNULL)


def startup_times(work: Path, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of each entry point's start (and --help) in a fresh process."""
    times = {}
    for name, args in STARTUP.items():
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, *args],
                cwd=work,
                env=_env(work),
                check=True,
                stdout=subprocess.DEVNULL,
            )
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    return times


GC_IMPORTS = (
    "torch",
    "segmentation_models_pytorch",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
)
_GC_PROBE = """
import sys, time
start = time.perf_counter()
if sys.argv[1] == "off":
    from gtaseg.startup import import_without_gc
    import_without_gc(*sys.argv[2:])
else:
    import importlib
    for name in sys.argv[2:]:
        importlib.import_module(name)
seconds = time.perf_counter() - start
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(seconds, rss)
"""


def gc_import_costs(work: Path, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Median seconds and resident MiB of importing GC_IMPORTS with the collector on (Python's
    default) and off (gtaseg.startup, as the entry points import), in fresh processes."""
    costs = {}
    for mode in ("on", "off"):
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", _GC_PROBE, mode, *GC_IMPORTS],
                cwd=work,
                env=_env(work),
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            runs.append((float(out[0]), float(out[1])))
        costs[mode] = {
            "s": statistics.median(r[0] for r in runs),
            "rss_mib": statistics.median(r[1] for r in runs),
        }
    return costs


def measure_stage(work: Path, via: str, stage_args: list[str], env: dict[str, str]) -> dict:
    """One train stage in a fresh child process, from a clean run folder."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    phases_out = work / f"phases-{via}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", via, "--", *stage_args]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    end = time.perf_counter()
    result = json.loads(phases_out.read_text())
    main_end = result["child_start"] + result["child_s"]
    exit_stamp = float(phases_out.with_suffix(".exit").read_text())
    result["process_s"] = end - start
    result["interpreter_start_s"] = result["child_start"] - start
    result["exit_handlers_s"] = exit_stamp - main_end
    result["interpreter_teardown_s"] = end - exit_stamp
    return result


def phase_rows(result: dict) -> list[tuple[str, float, int | None]]:
    """(label indented by depth, seconds, calls) in call-tree order; each wrapped call's time
    not covered by its wrapped children is listed under it as `other`."""
    phases = {tuple(p["path"]): (p["s"], p["calls"]) for p in result["phases"]}
    rows: list[tuple[str, float, int | None]] = []

    def visit(path: tuple[str, ...]) -> None:
        seconds, calls = phases[path]
        indent = "&nbsp;&nbsp;" * (len(path) - 1)
        rows.append((indent + path[-1], seconds, calls))
        children = [p for p in phases if len(p) == len(path) + 1 and p[: len(path)] == path]
        for child_path in sorted(children, key=lambda p: -phases[p][0]):
            visit(child_path)
        if children and path[-1] != LOOP:
            rest = seconds - sum(phases[p][0] for p in children if p[-1] != OVERLAP)
            rows.append((indent + "&nbsp;&nbsp;other", rest, None))

    for top in sorted((p for p in phases if len(p) == 1), key=lambda p: -phases[p][0]):
        visit(top)
    return rows


def format_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Where a training stage's seconds go",
        "",
        f"`python benchmarks/profile_stage.py --iters {s['iters']} --via {s['via']} "
        f"--log-models {s['log_models']}` "
        f"({s['stage']}; {s['cpus']} CPUs, torch threads {s['torch_threads']}).",
        "",
    ]
    for via, result in report["stages"].items():
        loop = next((p["s"] for p in result["phases"] if p["path"][-1] == LOOP), 0.0)
        beyond = result["process_s"] - loop
        top = sum(p["s"] for p in result["phases"] if len(p["path"]) == 1)
        lines += [
            f"## `python -m pipelines.{via} train ...`: {result['process_s']:.1f} s, of which "
            f"loop {loop:.1f} s, beyond the loop {beyond:.1f} s",
            "",
            "| phase | s | calls | s per call |",
            "|---|---:|---:|---:|",
            f"| interpreter start | {result['interpreter_start_s']:.2f} | | |",
        ]
        exits = [
            f"| exit handlers (atexit) | {result['exit_handlers_s']:.2f} | | |",
            f"| interpreter teardown | {result['interpreter_teardown_s']:.2f} | | |",
        ]
        lines += [f"| {name} | {sec:.2f} | | |" for name, sec in result["imports"].items()]
        for name, sec, calls in phase_rows(result):
            per = f"{sec / calls:.3f}" if calls else ""
            lines.append(f"| {name} | {sec:.2f} | {calls or ''} | {per} |")
        rest = result["child_s"] - sum(result["imports"].values()) - top
        lines += [f"| other (argument parsing, params) | {rest:.2f} | | |", *exits, ""]
        collected = result["gc"]
        lines += [
            f"Garbage collection, inside the phases above: {collected['s']:.2f} s in "
            f"{collected['collections']} collections, {collected['full']} of them full.",
            "",
        ]
    lines += ["## Process start and `--help` (median of 3)", "", "| command | s |", "|---|---:|"]
    lines += [f"| `{cmd}` | {sec:.2f} |" for cmd, sec in report["startup"].items()]
    costs = report["gc_imports"]
    lines += [
        "",
        f"## Importing {', '.join(GC_IMPORTS)} (median of 3)",
        "",
        "| garbage collector | s | resident MiB after |",
        "|---|---:|---:|",
        f"| on (Python's default) | {costs['on']['s']:.2f} | {costs['on']['rss_mib']:.0f} |",
        f"| off, then frozen (gtaseg.startup, as the entry points import) | "
        f"{costs['off']['s']:.2f} | {costs['off']['rss_mib']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=120,
        help="train.max_iters (default 120: one demo epoch at 1/16, one evaluation)",
    )
    parser.add_argument("--via", choices=["stages", "flows", "both"], default="both")
    parser.add_argument("--ratio", default="1_16")
    parser.add_argument("--method", default="gta")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument(
        "--log-models",
        choices=["promoted", "every_run"],
        default="promoted",
        help="tracking.log_models (every_run: the stage traces and logs the MLflow model too)",
    )
    parser.add_argument("--work", default="results/profile_stage", help="set-up and run folder")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/profile_stage.md"))
    parser.add_argument("--child", choices=["stages", "flows"], help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        return child(
            args.child, [a for a in rest if a != "--"], Path.cwd() / f"phases-{args.child}.json"
        )
    work = Path(args.work).resolve()
    set_up(work, args.pretrain_epochs, args.ratio, args.log_models)
    stage_args = [
        "train",
        "--ratio",
        args.ratio,
        "--method",
        args.method,
        "--seed",
        "0",
        "--set",
        f"train.max_iters={args.iters}",
    ]
    if not (work / "mlflow.db").is_file():
        print("[profile] warm-up stage (creates the MLflow store; not reported)", flush=True)
        measure_stage(work, "stages", stage_args, _env(work))
    vias = ["stages", "flows"] if args.via == "both" else [args.via]
    stages = {}
    for via in vias:
        print(f"[profile] measuring pipelines.{via} train", flush=True)
        if via == "flows":
            with prefect_server(work / ".prefect-server") as url:
                stages[via] = measure_stage(
                    work, via, stage_args, _env(work, {"PREFECT_API_URL": url})
                )
        else:
            stages[via] = measure_stage(work, via, stage_args, _env(work))
    print("[profile] timing process start-up", flush=True)
    import torch

    report = {
        "settings": {
            "iters": args.iters,
            "log_models": args.log_models,
            "via": args.via,
            "stage": " ".join(stage_args),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "stages": stages,
        "startup": startup_times(work),
        "gc_imports": gc_import_costs(work),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_markdown(report))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
