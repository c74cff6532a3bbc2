"""Deployment files: docker-compose stack, Kubernetes work-pool template, prefect.yaml, Dockerfile,
the image's requirement files, the zombie-run automation.

Docker and Kubernetes cannot run on this machine (nor in CI), so these are schema and rendering
checks: the compose file is parsed as YAML, the job template is validated by the Prefect server's
own check and rendered with Prefect's own templating, prefect.yaml is parsed with Prefect's own
model, the automation with Prefect's, and the Dockerfile and .dockerignore are read as text.
Nothing is built, pulled or started. The deployments of prefect.yaml do run, on a process pool
stand-in for the cluster: tests/test_scaleout.py.
"""

import asyncio
import copy
import fnmatch
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import pytest
import yaml
from prefect.workers.base import BaseJobConfiguration

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "docker-compose.yaml"
TEMPLATE = ROOT / "infra" / "k8s-job-template.json"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|AUTH", re.IGNORECASE)
FLOW_PARAMETERS = {
    "train_flow": {
        "config_path",
        "ratio",
        "method",
        "seed",
        "overrides",
        "inputs",
        "parent_run_id",
    },
    "sweep_flow": {"config_path", "ratios", "methods", "seeds", "train_deployment", "inputs"},
}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text())


def _prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_compose_publishes_every_port_on_loopback_only() -> None:
    published = []
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # long syntax
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
            published.append(name)
    assert {"minio", "mlflow", "prefect"} <= set(published)


def test_compose_takes_secrets_from_the_env_file_only() -> None:
    compose = _compose()
    required_interpolation = re.compile(r"^\$\{[A-Z0-9_]+(:\?[^}]*)?\}$")  # no inline default
    checked = 0
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_KEY.search(key):
                assert required_interpolation.match(value), f"{name}.{key} = {value!r}"
                checked += 1
    assert checked >= 6
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "infra" / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    secrets = {k: v for k, v in example.items() if SECRET_KEY.search(k)}
    assert secrets and all("change-me" in v or "example" in v for v in secrets.values())
    assert not any(v in COMPOSE.read_text() for v in secrets.values())


def test_compose_mlflow_stores_artifacts_in_the_minio_bucket() -> None:
    services = _compose()["services"]
    mlflow = services["mlflow"]
    assert "--artifacts-destination s3://mlflow/" in mlflow["command"]
    assert _environment(mlflow)["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow" in services["minio-init"]["command"][0].split("for bucket in ")[1]
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_k8s_template_passes_prefect_server_validation() -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    template = _template()
    assert validate_base_job_template(template) == template
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpus"]
    with pytest.raises(ValueError, match="gpus"):
        validate_base_job_template(broken)


class _KubernetesJobConfiguration(BaseJobConfiguration):
    """The fields of prefect-kubernetes' job configuration (that package is not installed here)."""

    namespace: str = "default"
    job_manifest: dict[str, Any]
    cluster_config: dict[str, Any] | None = None
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int = 60
    stream_output: bool = True


def _render(values: dict[str, Any]) -> _KubernetesJobConfiguration:
    """Render the template the way a Prefect worker does (defaults, env merge, placeholders).

    `client` is only used to resolve block / variable references, which this template has none of.
    """
    render = _KubernetesJobConfiguration.from_template_and_values(
        _template(), values, client=object()
    )
    return asyncio.run(render)


def _check_worker_required_shape(manifest: dict[str, Any]) -> None:
    """The prefect-kubernetes worker's own check: these paths must exist with these values."""
    base = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"labels": {}},
        "spec": {
            "template": {
                "spec": {
                    "parallelism": 1,
                    "completions": 1,
                    "restartPolicy": "Never",
                    "containers": [{"name": "prefect-job"}],
                }
            }
        },
    }
    manifest = {**manifest, "metadata": {"labels": {}, **manifest["metadata"]}}
    bad = [op for op in jsonpatch.make_patch(manifest, base) if op["op"] in ("add", "replace")]
    assert not bad, f"the worker would reject the manifest: {bad}"


def test_k8s_template_renders_a_gpu_job_with_defaults() -> None:
    config = _render({})
    manifest = config.job_manifest
    assert "{{" not in json.dumps(manifest) and "{{" not in json.dumps(config.env)
    _check_worker_required_shape(manifest)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "gtaseg-train:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # a lost pod is detected
    assert container["envFrom"] == [{"secretRef": {"name": "gtaseg-storage"}}]
    assert "args" not in container  # the worker fills in `prefect flow-run execute`
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (
        config.env["GTASEG_TRAIN_LAUNCHER"] == "torchrun --standalone --nnodes 1 --nproc_per_node 1"
    )
    assert config.pod_watch_timeout_seconds == 600


def test_k8s_template_gpus_drive_the_gpu_limit_and_torchrun() -> None:
    config = _render({"gpus": 4, "env": {"EXTRA": "1"}, "node_selector": {"gpu": "h100"}})
    pod = config.job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert config.env["GTASEG_NPROC_PER_NODE"] == "4"
    assert config.env["GTASEG_TRAIN_LAUNCHER"].endswith("--nproc_per_node 4")
    assert config.env["EXTRA"] == "1"  # a deployment's env is merged, not a replacement


def test_gpu_deployments_job_variables_match_the_template_schema() -> None:
    schema = _template()["variables"]
    gpu_deployments = [
        d for d in _prefect_yaml()["deployments"] if d["work_pool"]["name"] == "gtaseg-gpu"
    ]
    assert gpu_deployments
    for deployment in gpu_deployments:
        jsonschema.validate(deployment["work_pool"]["job_variables"], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"gpus": -1}, schema)
    gpus = {d["name"]: d["work_pool"]["job_variables"]["gpus"] for d in gpu_deployments}
    assert max(gpus.values()) > 1 and gpus["sweep-cluster"] == 0  # the sweep only orchestrates


def _flow_name(entrypoint: str) -> str:
    module, _, name = entrypoint.rpartition(".")
    assert module == "pipelines.flows", entrypoint  # a module path: jobs import installed code
    return name


def test_prefect_yaml_has_local_and_gpu_deployments_of_both_flows() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = _prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)
    assert not model.build and not model.push  # the image is built with docker (infra/README.md)
    assert raw["pull"] == []  # local jobs work in their worker's fresh folder, nothing pulled
    pairs = {(_flow_name(d.entrypoint), d.work_pool.name) for d in model.deployments}
    for flow in FLOW_PARAMETERS:
        assert {(flow, "gtaseg-local"), (flow, "gtaseg-gpu")} <= pairs
    by_name = {d.name: d for d in model.deployments}
    for deployment in model.deployments:
        flow = _flow_name(deployment.entrypoint)
        assert set(deployment.parameters) <= FLOW_PARAMETERS[flow]
        if deployment.work_pool.name == "gtaseg-gpu":
            step = deployment.pull[0]["prefect.deployments.steps.set_working_directory"]
            assert step["directory"] == _dockerfile_value("WORKDIR")
            # the image from one variable, the same for every job
            assert deployment.work_pool.job_variables["image"] == "{{ $GTASEG_IMAGE }}"
        if flow == "sweep_flow":  # its cells run on a training deployment of the same pool
            target = deployment.parameters["train_deployment"].split("/")[1]
            assert _flow_name(by_name[target].entrypoint) == "train_flow"
            assert by_name[target].work_pool.name == deployment.work_pool.name
    queues = {d.name: d.work_pool.work_queue_name for d in model.deployments}
    assert queues["train-local"] != queues["sweep-local"]  # training workers take only cells


def test_prefect_yaml_entrypoints_are_prefect_flows() -> None:
    from prefect import Flow

    module = importlib.import_module("pipelines.flows")
    for deployment in _prefect_yaml()["deployments"]:
        name = _flow_name(deployment["entrypoint"])
        flow = getattr(module, name)
        assert isinstance(flow, Flow), f"{name} is not a Prefect flow"
        assert set(inspect.signature(flow.fn).parameters) == FLOW_PARAMETERS[name]
        flow.validate_parameters(deployment["parameters"])  # what a flow run would be given


def test_the_zombie_run_automation_is_valid_and_crashes_silent_runs() -> None:
    from prefect.events.schemas.automations import AutomationCore

    raw = yaml.safe_load((ROOT / "infra" / "automation-crash-lost-runs.yaml").read_text())
    automation = AutomationCore.model_validate(raw)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
    heartbeat = int(_template()["job_configuration"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert trigger.within.total_seconds() >= 2 * heartbeat  # a late beat is no crash
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _dockerfile_value(instruction: str) -> str:
    return [args for name, args in _dockerfile_instructions() if name == instruction][-1]


def test_dockerfile_installs_the_runtime_subset_and_runs_as_a_non_root_user() -> None:
    steps = _dockerfile_instructions()
    assert _dockerfile_value("FROM").startswith(("python:3.11", "nvidia/cuda:12"))
    runs = [args for name, args in steps if name == "RUN"]
    args = dict(a.split("=", 1) for name, a in steps if name == "ARG")
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    index = next(i for i, (n, a) in enumerate(steps) if '--index-url "$TORCH_INDEX_URL"' in a)
    assert "-r requirements/torch.txt" in steps[index][1]
    assert "pip install -r requirements/runtime.txt" in steps[index][1]
    assert not any("lock.txt" in a for _, a in steps)  # the lock carries the test tools
    project_install = next(i for i, (n, a) in enumerate(steps) if "pip install --no-deps ." in a)
    copy_all = next(i for i, (n, a) in enumerate(steps) if n == "COPY" and a.endswith(" . ."))
    assert index < copy_all < project_install  # the heavy layer survives code edits
    user = _dockerfile_value("USER")
    assert user not in ("root", "0")
    uid = re.search(r"--uid (\d+)", " ".join(runs)).group(1)
    pod_security = _template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert int(uid) == pod_security["securityContext"]["runAsUser"]
    # the work dir exists, owned by the job's user, before WORKDIR (which would create it as root)
    workdir = _dockerfile_value("WORKDIR")
    made = next(i for i, (n, a) in enumerate(steps) if f"install -d -o {user} -g {user} {workdir}"
                in a)  # fmt: skip
    assert made < next(i for i, (n, a) in enumerate(steps) if n == "WORKDIR")
    assert steps[copy_all][1].startswith(f"--chown={user}:{user} ")
    assert json.loads(_dockerfile_value("ENTRYPOINT"))[0].endswith("tini")
    env = _dockerfile_value("ENV")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180" in env
    assert "GTASEG_GIT_COMMIT=$GIT_COMMIT" in env and "GIT_COMMIT" in args


def test_the_image_requirements_are_the_locks_runtime_subset() -> None:
    import subprocess
    import sys

    check = subprocess.run([sys.executable, "scripts/runtime_requirements.py", "--check"],
                           cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr
    lock = {line.split("==")[0]: line for line in (ROOT / "requirements/lock.txt").read_text()
            .splitlines() if "==" in line and not line.startswith(" ")}  # fmt: skip
    image = [line for name in ("torch.txt", "runtime.txt")
             for line in (ROOT / "requirements" / name).read_text().splitlines()
             if line and not line.startswith("#")]  # fmt: skip
    names = {line.split("==")[0] for line in image}
    assert all(lock[line.split("==")[0]] == line for line in image)  # the lock's versions
    assert {"torch", "torchvision", "prefect", "mlflow", "dvc", "boto3", "pandas"} <= names
    assert not names & {"pytest", "pytest-timeout", "moto", "ruff"}  # no test tools
    assert not any(n.startswith("nvidia-") for n in names)  # the CUDA index's torch brings them


def test_dockerignore_drops_outputs_and_secrets_but_keeps_the_sources() -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        prefixes = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
        return any(fnmatch.fnmatch(p, pat) for p in prefixes for pat in patterns)

    for path in ("runs/r1/ckpt.pt", "mlruns/0", "data/embedded/x.png", ".git/HEAD", "infra/.env"):
        assert ignored(path), path
    for path in (
        "requirements/lock.txt",
        "pyproject.toml",
        "gtaseg/training/loop.py",
        "pipelines/flows.py",
    ):
        assert not ignored(path), path
