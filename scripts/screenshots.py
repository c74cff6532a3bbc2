"""Screenshots of where users look, taken from a real sweep in a real browser (docs/screens/).

Starts an MLflow server and a Prefect server on loopback (their stores in a scratch folder), runs
the Prefect sweep there on a shrunk copy of params.yaml (SHRINK below: the demo's dataset and
matrix, fewer epochs, so it takes minutes on two CPU cores), then points headless Chromium
(Debian's `chromium` package) at the MLflow and Prefect UIs:

    bash scripts/run.sh -- python scripts/screenshots.py [--out docs/screens] [--keep DIR]

Writes the PNGs, `screenshots_params.yaml` (the shrunk params the sweep ran) and
`screenshots_pages.json` (each screenshot's URL) into --out. The UIs are single-page apps:
Chromium's virtual time budget lets them fetch and render before the shot. --no-sweep
photographs again the sweep kept with --keep DIR (on the same ports, so its links hold).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The demo's dataset, ratios, methods and full-label reference; fewer epochs (a smaller network
# would change what the demo shows; fewer epochs only lowers the scores).
SHRINK = {
    ("pretrain", "pretrained", "epochs"): 4,
    ("sweep", "epochs"): {"1_16": 2, "1_4": 2, "full": 2},
    ("run", "semi", "sup_only_epochs"): 1,
    ("run", "eval", "max_images"): 64,
}
WINDOW = "1600,1000"


def shrunk_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for path, value in SHRINK.items():
        section = params
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = value
    return params


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path, env: dict[str, str], health: str) -> subprocess.Popen:
    """A server in its own process group, returned once `health` answers (or exit 1)."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"screenshots: {command[2]} exited; see {log}")
        try:
            if requests.get(health, timeout=2).ok:
                return process
        except requests.RequestException:
            pass
        time.sleep(1)
    sys.exit(f"screenshots: {health} did not answer in 300 s; see {log}")


def shoot(url: str, png: Path, window: str = WINDOW) -> None:
    """One screenshot of `url` by headless Chromium (run as root in a container: no sandbox)."""
    browser = shutil.which("chromium") or sys.exit(
        "screenshots: expected Debian's chromium on PATH; apt-get install -y chromium"
    )
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: the UIs' default views
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={window}",
             "--virtual-time-budget=15000", f"--screenshot={png}", url],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    print(f"wrote {png} <- {url}")


def pages(mlflow: str, prefect_ui: str, scratch: Path) -> dict[str, str]:
    """The URLs worth a screenshot, found through the servers' APIs; a name ending in `@WxH`
    is shot in a window of that size (a page whose point is below the first screen)."""
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.mlflow_views import comparison_view_key, comparison_view_url

    client = MlflowClient(mlflow)
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id
    (parent,) = client.search_runs([experiment], "tags.`gtaseg.sweep` != ''", max_results=1)
    run = f"{mlflow}/#/experiments/{experiment}/runs/{parent.info.run_id}"
    with get_client(sync_client=True) as prefect:
        sweep = prefect.read_flow_by_name("gtaseg-sweep")
        (flow_run,) = [r for r in prefect.read_flow_runs() if r.flow_id == sweep.id]
        key = ArtifactFilterKey(any_=["demo-sweep-summary", "demo-sweep-runs"])
        artifacts = {
            a.key: a.id for a in prefect.read_artifacts(artifact_filter=ArtifactFilter(key=key))
        }
    artifact = f"{prefect_ui}/artifacts/artifact"
    runs = f"{mlflow}/#/experiments/{experiment}/runs"
    view = comparison_view_url(
        mlflow, experiment, comparison_view_key(params["tracking"]["sweep_name"])
    )
    return {
        "mlflow_comparison_view@2200x1000": view,
        "mlflow_experiment@2200x1000": f"{runs}?workflowType=machine_learning",
        "mlflow_experiment_charts@2200x1400": f"{runs}?workflowType=machine_learning"
        "&compareRunsMode=CHART",
        "mlflow_sweep_run@1600x1900": run,
        "mlflow_miou_vs_ratio": f"{run}/artifacts/miou_vs_ratio.png",
        "prefect_sweep_run": f"{prefect_ui}/runs/flow-run/{flow_run.id}",
        "prefect_sweep_artifacts": f"{prefect_ui}/v2/runs/flow-run/{flow_run.id}?tab=Artifacts",
        "prefect_sweep_summary": f"{artifact}/{artifacts['demo-sweep-summary']}",
        "prefect_sweep_table": f"{artifact}/{artifacts['demo-sweep-runs']}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screens")
    parser.add_argument("--keep", type=Path, help="scratch folder to use and keep (default: temp)")
    parser.add_argument(
        "--no-sweep", action="store_true", help="photograph the sweep already in --keep DIR"
    )
    args = parser.parse_args(argv)
    if args.no_sweep and not (args.keep and (args.keep / "mlflow.db").is_file()):
        parser.error("--no-sweep needs --keep DIR holding an earlier sweep's stores")
    scratch = (args.keep or Path(tempfile.mkdtemp(prefix="gtaseg-screens-"))).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_sweep:
        (scratch / "params.yaml").write_text(yaml.safe_dump(shrunk_params(), sort_keys=False))
    shutil.copy(scratch / "params.yaml", args.out / "screenshots_params.yaml")
    ports_file = scratch / "ports.json"  # the same addresses again: the runs' links stay true
    if not args.no_sweep:
        ports_file.write_text(json.dumps([free_port(), free_port()]))
    mlflow_port, prefect_port = json.loads(ports_file.read_text())
    mlflow, prefect_ui = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow, "PREFECT_API_URL": f"{prefect_ui}/api",
           "PREFECT_HOME": str(scratch / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "GTASEG_PROGRESS": "0"}  # fmt: skip
    py = sys.executable
    servers = [
        start([py, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{scratch / 'mlflow.db'}",
               "--artifacts-destination", str(scratch / "artifacts")],
              scratch / "mlflow.log", env, f"{mlflow}/health"),
        start([py, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(prefect_port)], scratch / "prefect.log", env,
              f"{prefect_ui}/api/health"),
    ]  # fmt: skip
    try:
        started = time.monotonic()
        if not args.no_sweep:
            subprocess.run(
                [py, "-m", "pipelines.flows", "sweep", "--params", "params.yaml"],
                cwd=scratch, env=env, check=True,
            )  # fmt: skip
            print(f"sweep done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")})
        urls = pages(mlflow, prefect_ui, scratch)
        for name, url in urls.items():
            name, _, size = name.partition("@")
            shoot(url, args.out / f"{name}.png", size.replace("x", ",") or WINDOW)
        (args.out / "screenshots_pages.json").write_text(json.dumps(urls, indent=2) + "\n")
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
