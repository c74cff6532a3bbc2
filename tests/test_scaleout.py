"""The sweep on a work pool whose workers share no disk, on loopback: a stand-in for the GPU cluster
(infra/README.md). Started here: a Prefect server, moto's S3 server, an MLflow server whose artifact
root is in that S3, a process work pool `gtaseg-local` with two training workers and one for the
sweep, each in its own empty folder. The training workers take as many runs as they are given (no
`--limit`): only the sweep's concurrency limit bounds how many cells train at once. The
deployments come from prefect.yaml (`prefect deploy`), the zombie-run automation from infra/. The
tests share the stack and run in file order; each counts the training flow runs (jobs) and the
MLflow runs of every cell, and nothing may be trained twice:

1. the sweep deployment on a tiny config: every cell its own flow run, both training workers
   took cells, never more than `sweep.max_parallel` at once; every MLflow run FINISHED with its
   artifacts in S3; `champion` set; the orchestration cost per cell is reported;
2. SIGTERM to a training job (pre-emption): it checkpoints at the next step, pushes, and its
   flow run is Crashed; the sweep launches the cell again, which resumes at that very step and
   ends with test 1's metrics;
3. the sweep's process killed mid-sweep, then two sweeps of the same params at once (the rerun
   and a second one): both attach to the cells still training, none is launched again;
4. both servers out mid-training: the Prefect server restarts (the sweep and its job wait
   through it), and MLflow is down until after the job ended: the job's unsent records are in
   S3, and the sweep replays them once MLflow is back;
5. a training job cut off mid-training (SIGSTOP: no heartbeat, no write): Prefect marks its run
   Crashed, the sweep launches the cell again, and the new job claims the cell and resumes from
   the checkpoint in S3, ending with the same metrics as the uninterrupted run of test 1; the
   first job, back (SIGCONT), stops at its next checkpoint without writing, its run left Crashed.

No GPU or Kubernetes here: process workers stand in for the Kubernetes jobs (each flow run works
in a fresh folder of its worker, as a pod does in /app), loopback for the network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import psutil
import pytest
import yaml
from servers import MlflowServer, Service, kill_tree, moto_server, prefect_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STORAGE = "s3://gtaseg-runs/scaleout"
MAX_PARALLEL = 2


def tiny_params(name: str, methods: list[str]) -> dict:
    """24 scenes of 32 px, ratio 1/4 (6 labelled, 18 unlabelled: 9 iterations an epoch), two
    epochs, a checkpoint every 3 iterations; `name` keeps each test's MLflow runs, model, limit
    and stored run folders apart (the cell keys are the same)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data_prep"]["embedded"].update(n_train=24, n_val=4, size=32)
    params["pretrain"]["pretrained"].update(n_train=8, n_val=2, epochs=1)
    params["sweep"].update(ratios=["1_4"], methods=methods, full_seeds=[], epochs={"1_4": 2},
                           max_parallel=MAX_PARALLEL)  # fmt: skip
    params["tracking"].update(experiment=name, model_name=f"{name}-student", sweep_name=name)
    run = params["run"]
    run["data"]["crop_size"] = 32
    run["model"]["decoder_channels"] = 16
    run["train"].update(batch_size_labeled=2, batch_size_unlabeled=2, checkpoint_every_iters=3)
    run["semi"]["sup_only_epochs"] = 1
    run["eval"]["max_images"] = 2
    return params


class Stack:
    """The servers, the work pool and its workers; `env` points a process at all of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.moto = moto_server(root / "moto")
        s3 = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.moto.url,
        }
        (root / "mlflow").mkdir()
        self.mlflow = MlflowServer(
            root / "mlflow",
            artifacts="s3://mlflow/artifacts",
            env={**s3, "MLFLOW_S3_ENDPOINT_URL": self.moto.url},
        )
        self.prefect = prefect_server(root / "prefect")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))},
            **s3,
            "PREFECT_API_URL": self.prefect.url,
            "PREFECT_HOME": str(root / "client-home"),
            "MLFLOW_TRACKING_URI": self.mlflow.uri,
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
            "GTASEG_STORAGE_URI": STORAGE,
            "PYTHONPATH": str(ROOT),  # the jobs' code, as the image's installed package
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # one core per job on a busy CI machine
            "GTASEG_PROGRESS": "0",
        }
        self.workers: dict[str, Service] = {}

    def start(self) -> None:
        self.moto.launch()
        self.prefect.launch()
        self.moto.wait_healthy()
        s3 = boto3.client(
            "s3",
            endpoint_url=self.moto.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for bucket in ("gtaseg-runs", "mlflow"):
            s3.create_bucket(Bucket=bucket)
        self.mlflow.launch()
        self.prefect.wait_healthy()
        self.cli("work-pool", "create", "gtaseg-local", "--type", "process")
        self.cli("--no-prompt", "deploy", "--name", "train-local", "--name", "sweep-local")
        automation = yaml.safe_load((ROOT / "infra/automation-crash-lost-runs.yaml").read_text())
        automation["trigger"]["within"] = 60  # 90 shipped; two missed heartbeats suffice here
        self.cli("automation", "create", "--from-json", json.dumps(automation))
        for name, queue in (("train-a", "train"), ("train-b", "train"), ("sweep", "sweep")):
            self.start_worker(name, queue)
        self.mlflow.wait_healthy()

    def start_worker(self, name: str, queue: str) -> None:
        home = self.root / "workers" / name  # empty: nothing shared with the others
        (home / "tmp").mkdir(parents=True)
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gtaseg-local",
               "--work-queue", queue, "--name", name]  # fmt: skip
        worker = Service(name, home, cmd, f"{self.prefect.url}/health",
                         {**self.env, "TMPDIR": str(home / "tmp")})  # fmt: skip
        worker.launch()
        self.workers[name] = worker

    def cli(self, *args: str) -> str:
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, f"prefect {args}:\n{proc.stdout[-3000:]}\n{proc.stderr}"
        return proc.stdout

    def stop(self) -> None:
        for service in (*self.workers.values(), self.mlflow, self.prefect, self.moto):
            if isinstance(service, MlflowServer):
                service.kill()
            else:
                service.stop()

    def put_config(self, params: dict) -> str:
        """The sweep's params file, in S3 (the jobs share no folder with this test)."""
        key = f"configs/{params['tracking']['experiment']}.yaml"
        self.s3().put_object(Bucket="gtaseg-runs", Key=key, Body=yaml.safe_dump(params))
        return f"s3://gtaseg-runs/{key}"

    def s3(self):
        return boto3.client(
            "s3",
            endpoint_url=self.moto.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    stack = Stack(tmp_path_factory.mktemp("scaleout"))
    try:
        stack.start()
        with temporary_settings({PREFECT_API_URL: stack.prefect.url}):
            yield stack
    finally:
        stack.stop()


def train_runs(sweep_run_id=None) -> list:
    """The training flow runs (all of them, or those launched by one sweep flow run)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId as Parent

    parent = Parent(any_=[sweep_run_id]) if sweep_run_id else None
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["gtaseg-train"])),
            flow_run_filter=FlowRunFilter(parent_flow_run_id=parent) if parent else None,
        )


def sweep_log(run_id) -> str:
    """Every log line of the flow run, oldest first. The API returns at most a page per call
    (PREFECT_API_DEFAULT_LIMIT, 200), so read page after page."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter, limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return "\n".join(messages)


def cell_costs(run_id, cells: int, wait_s: float = 60) -> list[tuple[str, ...]]:
    """The sweep's per-cell cost lines. Its process ships log lines in the background, so the
    last may reach the server after the flow run is reported complete: read until all `cells`
    are there or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while len(costs := OVERHEAD.findall(sweep_log(run_id))) < cells and time.monotonic() < deadline:
        time.sleep(2)
    return costs


def max_overlap(runs: list) -> int:
    events = sorted(
        [(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )  # an end before a start at the same instant
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def cell_mlflow_runs(stack: Stack, name: str) -> dict[str, object]:
    """The runs of experiment `name` by method; the sweep's parent run and the encoder's
    pretraining run as "parent" and "pretrain"."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow.uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    by_role = {}
    for run in runs:
        tags = run.data.tags
        role = "parent" if "gtaseg.sweep" in tags else tags["gtaseg.method"]
        by_role[role if tags.get("gtaseg.ratio") != "pretrain" else "pretrain"] = run
    assert len(by_role) == len(runs), [r.data.tags for r in runs]  # one run each
    return by_role


OVERHEAD = re.compile(
    r"(\S+): ([\d.]+) s in the training loop, ([\d.-]+) s around it "
    r"\(([\d.]+) s to start\)"
)


def test_sweep_deployment_fans_cells_out_over_workers_without_shared_disk(stack):
    from mlflow.tracking import MlflowClient
    from prefect.deployments import run_deployment

    params = tiny_params("scaleout", ["supervised", "mean_teacher", "gta"])
    started = time.monotonic()
    sweep = run_deployment("gtaseg-sweep/sweep-local", timeout=900, poll_interval=2,
                           parameters={"config_path": stack.put_config(params)})  # fmt: skip
    wall = time.monotonic() - started
    assert sweep.state.is_completed(), sweep.state
    cells = train_runs(sweep.id)
    # every cell ran as its own flow run of the training deployment, launched by the sweep
    assert sorted(r.parameters["method"] for r in cells) == ["gta", "mean_teacher", "supervised"]
    assert all(r.state.is_completed() and r.parent_task_run_id for r in cells)
    assert {r.parameters["ratio"] for r in cells} == {"1_4"}
    # never more than max_parallel ran at once
    took = {name: {r.id for r in cells if f"submitting flow run '{r.id}'" in w.log.read_text()}
            for name, w in stack.workers.items()}  # fmt: skip
    # on the training workers, which take any number of runs (no `--limit`): the sweep's limit
    # alone kept the overlap at 2 of 3
    assert took["train-a"] | took["train-b"] == {r.id for r in cells} and not took["sweep"], took
    assert max_overlap(cells) == MAX_PARALLEL
    assert jobs_per_cell("scaleout") == {"supervised": 1, "mean_teacher": 1, "gta": 1}
    # every MLflow run FINISHED, each with its artifacts in the S3 bucket behind MLflow
    runs = cell_mlflow_runs(stack, "scaleout")
    assert set(runs) == {"parent", "pretrain", "supervised", "mean_teacher", "gta"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    stored = stack.keys("mlflow")
    for method in ("supervised", "mean_teacher", "gta"):
        run_id = runs[method].info.run_id
        files = {k.split(f"/{run_id}/artifacts/")[1] for k in stored if f"/{run_id}/" in k}
        assert {"metrics.json", "config.yaml", "checkpoints/last.pt"} <= files, method
        assert any(f.startswith("student_smp/") for f in files), method
    assert any(runs["parent"].info.run_id in k and k.endswith("summary.md") for k in stored)
    # the experiment's comparison view (the runs table by label ratio and method) holds the cells
    client = MlflowClient(stack.mlflow.uri)
    experiment = client.get_experiment_by_name("scaleout")
    view = json.loads(experiment.tags["mlflow.sharedViewState.gtaseg-scaleout"])
    shown = client.search_runs([experiment.experiment_id], view["searchFilter"])
    assert {r.info.run_id for r in shown} == {runs[m].info.run_id for m in
                                              ("supervised", "mean_teacher", "gta")}  # fmt: skip
    assert "viewStateShareKey=gtaseg-scaleout" in runs["parent"].data.tags["mlflow.note.content"]
    champion = client.get_model_version_by_alias("scaleout-student", "champion")
    assert champion.run_id in {runs[m].info.run_id for m in ("supervised", "mean_teacher", "gta")}
    model_id = champion.source.removeprefix("models:/")  # the logged model, stored in S3 too
    assert any(f"/models/{model_id}/artifacts/" in k for k in stored), champion.source
    # the cost of each cell beyond its training loop, as the sweep measured it
    costs = cell_costs(sweep.id, 3)
    assert sorted(c[0] for c in costs) == [f"1_4/{m}/seed0" for m in
                                           ("gta", "mean_teacher", "supervised")]  # fmt: skip
    report = "\n".join(f"| {cell} | {t} | {o} | {s} |" for cell, t, o, s in costs)
    print(
        f"\nsweep of 3 cells, max_parallel {MAX_PARALLEL}: {wall:.0f} s\n"
        f"| cell | training loop (s) | around it (s) | of which to start (s) |\n{report}"
    )
    for cell, train_s, overhead_s, start_s in costs:  # what the job added to its loop, in order
        loop_s = runs[cell.split("/")[1]].data.metrics["wall_time_s"]  # as the run recorded it
        assert float(train_s) == pytest.approx(loop_s, abs=0.06), cell
        assert 0 <= float(start_s) <= float(overhead_s), cell  # starting is part of the rest


def test_sigterm_to_a_training_job_checkpoints_and_the_relaunch_resumes_there(stack):
    sweep = _sweep(stack, tiny_params("scaleout-term", ["gta"]))
    run = _running_at_first_checkpoint(stack, sweep.id, "scaleout/cells/scaleout-term/")
    os.kill(_pid(run), signal.SIGTERM)  # what Kubernetes sends a pre-empted pod
    assert (state := _wait_final(sweep.id)).is_completed(), state
    attempts = sorted(train_runs(sweep.id), key=lambda r: r.start_time)
    assert [r.state.type.value for r in attempts] == ["CRASHED", "COMPLETED"]
    assert attempts[0].id == run.id
    log = "".join(w.log.read_text() for n, w in stack.workers.items() if n.startswith("train"))
    stopped = re.findall(r"stopped on SIGTERM after iteration (\d+)", log)
    resumed = re.findall(r"resumed from runs/1_4/gta/seed0/checkpoints/last.pt at iteration "
                         r"(\d+)/18", log)  # fmt: skip
    # it stopped past the first checkpoint (3) and the relaunch lost none of its steps
    assert len(stopped) == 1 and int(stopped[0]) >= 3, log[-3000:]
    assert resumed == stopped, log[-3000:]
    runs = mlflow_runs_per_cell(stack, "scaleout-term")
    assert len(runs["gta"]) == 1 and runs["gta"][0].info.status == "FINISHED"
    straight = cell_mlflow_runs(stack, "scaleout")["gta"]
    for key in ("best_val_miou_student", "val_miou_student", "val_miou_teacher", "pseudo_miou"):
        assert runs["gta"][0].data.metrics[key] == straight.data.metrics[key], key


def test_a_dead_sweep_rerun_and_a_second_sweep_at_once_launch_no_cell_twice(stack):
    params = tiny_params("scaleout-twice", ["supervised", "gta"])
    first = _sweep(stack, params)
    cell = _wait_for(lambda: [r for r in train_runs(first.id) if r.state.is_running()],
                     "a cell of the first sweep training")[0]  # fmt: skip
    sweep_run = _wait_for(lambda: _flow_run(first.id).infrastructure_pid, "the sweep's process")
    kill_tree(int(str(sweep_run).rsplit(":", 1)[-1]))  # the sweep dies; its jobs train on
    again = [_sweep(stack, params) for _ in range(2)]  # its rerun, and a second sweep at once
    for sweep in again:
        assert (state := _wait_final(sweep.id)).is_completed(), state
    assert jobs_per_cell("scaleout-twice") == {"supervised": 1, "gta": 1}
    assert cell.id in {r.id for r in train_runs()}  # attached to, not launched again
    runs = mlflow_runs_per_cell(stack, "scaleout-twice")
    assert {m: [r.info.status for r in rs] for m, rs in runs.items()} == {
        "supervised": ["FINISHED"], "gta": ["FINISHED"]}  # fmt: skip


def test_prefect_restarted_and_mlflow_down_until_the_cells_end_are_waited_through(stack):
    """An outage of both servers mid-training: the Prefect server restarts (the sweep and the
    job wait through it, nothing is launched twice), and MLflow stays down until after the job
    ended (its unsent records go to S3, and the sweep replays them once MLflow is back)."""
    sweep = _sweep(stack, tiny_params("scaleout-outage", ["gta"]))
    cell = "scaleout/cells/scaleout-outage/"
    run = _running_at_first_checkpoint(stack, sweep.id, cell)
    stack.mlflow.kill()
    try:  # the job trains on, ends, and leaves what it could not send in the run folder
        stack.prefect.restart()
        assert (job := _wait_final(run.id)).is_completed(), job
        unsent = [k for k in stack.keys("gtaseg-runs", cell) if "/tracking-fallback/" in k]
        assert any(k.endswith(".jsonl") for k in unsent), unsent
    finally:
        stack.mlflow.start()  # same port, same store
    assert (state := _wait_final(sweep.id)).is_completed(), state
    assert jobs_per_cell("scaleout-outage") == {"gta": 1}
    runs = mlflow_runs_per_cell(stack, "scaleout-outage")
    assert len(runs["gta"]) == 1 and runs["gta"][0].info.status == "FINISHED"
    straight = cell_mlflow_runs(stack, "scaleout")["gta"]
    assert runs["gta"][0].data.metrics["best_val_miou_student"] == (
        straight.data.metrics["best_val_miou_student"])  # fmt: skip
    stored = [k for k in stack.keys("gtaseg-runs", cell) if k.endswith(".jsonl")]
    assert stored == []  # replayed once, then removed


def _flow_run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_a_job_cut_off_mid_training_is_relaunched_and_stops_when_it_comes_back(stack):
    params = tiny_params("scaleout-kill", ["gta"])
    sweep = _sweep(stack, params)
    cell = "scaleout/cells/scaleout-kill/1_4/gta/seed0/"
    lost = _running_at_first_checkpoint(stack, sweep.id, cell)
    job = psutil.Process(_pid(lost))

    def relaunched() -> list:
        return [r for r in train_runs(sweep.id) if r.id != lost.id and r.state.is_running()]

    job.suspend()  # SIGSTOP: no heartbeat, no write, as if cut off from the network
    try:  # the automation marks it Crashed; the sweep launches the cell again, which claims it
        again = _wait_for(relaunched, "the cell launched again")[0]
        _wait_for(lambda: str(again.id) in _claim(stack, cell), "the new job's claim")
    finally:
        job.resume()  # it comes back, trains on to its next checkpoint, and stops there
    job.wait(timeout=300)  # gone (not a child of this test: no exit status to read here)
    assert (state := _wait_final(sweep.id)).is_completed(), state
    attempts = sorted(train_runs(sweep.id), key=lambda r: r.start_time)
    assert [r.id for r in attempts] == [lost.id, again.id]
    assert [r.state.type.value for r in attempts] == ["CRASHED", "COMPLETED"]  # left Crashed
    log = "".join(w.log.read_text() for n, w in stack.workers.items() if n.startswith("train"))
    stopped = r"stopped: .*claimed by another job \(flow_run " + str(again.id)
    assert re.search(stopped, log), log[-3000:]
    assert f"Execution of flow run '{lost.id}' aborted by orchestrator" in log, log[-3000:]
    # the second job resumed the stored checkpoint (and the same MLflow run), not iteration 0
    assert f"restored from {STORAGE}/cells/scaleout-kill/1_4/gta/seed0" in log
    resumed = re.findall(r"resumed from runs/1_4/gta/seed0/checkpoints/last.pt at iteration "
                         r"(\d+)/18", log)  # fmt: skip
    assert resumed and int(resumed[-1]) >= 3, log[-3000:]
    runs = cell_mlflow_runs(stack, "scaleout-kill")
    assert set(runs) == {"parent", "pretrain", "gta"} and runs["gta"].info.status == "FINISHED"
    straight = cell_mlflow_runs(stack, "scaleout")["gta"]  # test 1's uninterrupted run of this cell
    for key in ("best_val_miou_student", "val_miou_student", "val_miou_teacher", "pseudo_miou"):
        assert runs["gta"].data.metrics[key] == straight.data.metrics[key], key


def _claim(stack: Stack, cell: str) -> str:
    """The claim on the cell's stored folder (`cell` is the prefix of its name), or ""."""
    claims = [k for k in stack.keys("gtaseg-runs", cell.rstrip("/")) if k.endswith(".claim")]
    if not claims:
        return ""
    return stack.s3().get_object(Bucket="gtaseg-runs", Key=claims[0])["Body"].read().decode()


def _state(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def _running_at_first_checkpoint(stack: Stack, sweep_id, cell: str):
    """The sweep's one running training flow run, once its first checkpoint and its checksum
    are stored in S3 under `cell` (the prefix of the cell's folders; the folder itself is named
    by a digest)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        running = [r for r in train_runs(sweep_id) if r.state.is_running()]
        stored = stack.keys("gtaseg-runs", cell)
        if running and any(k.endswith("/checkpoints/last.pt.sha256") for k in stored):
            (run,) = running
            return run
        time.sleep(0.5)
    pytest.fail(f"no checkpoint under s3://gtaseg-runs/{cell} within 600 s")


def _pid(flow_run) -> int:
    """The process of a flow run on a process worker ("host:pid")."""
    return int(str(flow_run.infrastructure_pid).rsplit(":", 1)[-1])


def _wait_final(flow_run_id, timeout_s: float = 900):
    deadline = time.monotonic() + timeout_s
    while not (state := _state(flow_run_id)).is_final() and time.monotonic() < deadline:
        time.sleep(3)
    return state


def _wait_for(find, what: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := find():
            return found
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def _sweep(stack: Stack, params: dict):
    """Start the sweep deployment on `params`; its flow run, at once."""
    from prefect.deployments import run_deployment

    return run_deployment("gtaseg-sweep/sweep-local", timeout=0,
                          parameters={"config_path": stack.put_config(params)})  # fmt: skip


def jobs_per_cell(name: str) -> Counter:
    """How many training flow runs (jobs) each method's cell of experiment `name` got, from
    any sweep."""
    config = f"/{name}.yaml"  # the sweep hands its cells the local copy of the params file
    return Counter(r.parameters["method"] for r in train_runs()
                   if r.parameters.get("config_path", "").endswith(config))  # fmt: skip


def mlflow_runs_per_cell(stack: Stack, name: str) -> dict[str, list]:
    """The MLflow runs of each method's cell in experiment `name` (parent runs left out)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow.uri)
    experiment = client.get_experiment_by_name(name)
    by_method: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        tags = run.data.tags
        if "gtaseg.sweep" not in tags and tags.get("gtaseg.ratio") != "pretrain":
            by_method.setdefault(tags["gtaseg.method"], []).append(run)
    return by_method
