"""Deployment files: docker-compose stack, Kubernetes work-pool template, prefect.yaml, Dockerfile,
the image's requirement files, the zombie-run automation.

Docker and Kubernetes cannot run on this machine (nor in CI), so these are schema and rendering
checks: the compose file is parsed as YAML; the job template is validated by the Prefect server's
own check, rendered by prefect-kubernetes' own job configuration (the worker's code path), and the
Job it makes is validated against the Kubernetes API schema (kubernetes-validate, strict) and the
"restricted" Pod Security Standard (tests/pod_security.py); prefect.yaml is parsed with Prefect's
own model, the automation with Prefect's, and the Dockerfile and .dockerignore are read as text.
The manifests under infra/k8s/: tests/test_k8s_manifests.py.
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
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pod_security import RULES, restricted_violations

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


# the oldest Kubernetes the Job must satisfy, and the newest schema kubernetes-validate ships
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
IMAGE = "registry.example.com/gtaseg/train:3f2c1ab"  # a commit-tagged image, as deployed
IN_CLUSTER_API = "http://prefect-server.gtaseg.svc.cluster.local:4200/api"
# The two fields prefect-kubernetes' own check (`_get_base_job_manifest`) insists on in the pod
# spec. PodSpec has no such fields: the API server drops them with a warning (the default
# fieldValidation of a request that names none, as the worker's create_namespaced_job does).
# The Job spec carries the real ones.
WORKER_ONLY_POD_FIELDS = ("parallelism", "completions")


def _worker_job(values: dict[str, Any]) -> Any:
    """The Job prefect-kubernetes' worker would create for a flow run of a deployment with
    job variables `values`: its own job configuration class, Prefect's templating, then the
    worker's `prepare_for_flow_run` (env list, labels, command, generateName), with the worker's
    PREFECT_API_URL the in-cluster one. `client` only resolves block references (none here)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    render = KubernetesWorkerJobConfiguration.from_template_and_values(
        _template(), values, client=object()
    )
    config = asyncio.run(render)
    with temporary_settings({PREFECT_API_URL: IN_CLUSTER_API}):
        config.prepare_for_flow_run(
            FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4())
        )
    return config


def _as_stored(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Job as the API server stores it: the worker-only pod-spec fields dropped."""
    stored = copy.deepcopy(manifest)
    pod = stored["spec"]["template"]["spec"]
    assert all(pod.pop(key) == 1 for key in WORKER_ONLY_POD_FIELDS)
    return stored


def _check_job(config: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Checks every rendered Job must pass; returns (pod spec, container, env)."""
    manifest = config.job_manifest
    assert "{{" not in json.dumps(manifest)
    stored = _as_stored(manifest)
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError) as raw:
            kubernetes_validate.validate(manifest, version, strict=True)
        # the worker-only pod fields are the manifest's only fields the API does not know
        assert re.findall(r"'(\w+)'", raw.value.message) == sorted(WORKER_ONLY_POD_FIELDS)
        kubernetes_validate.validate(stored, version, strict=True)
    assert stored["spec"]["parallelism"] == stored["spec"]["completions"] == 1
    pod = stored["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False  # a training job never calls the API
    (container,) = pod["containers"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PREFECT_API_URL"] == IN_CLUSTER_API  # the worker's own, handed to the job
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # a lost pod is detected
    return pod, container, env


def test_k8s_template_renders_a_valid_restricted_gpu_job_with_defaults() -> None:
    config = _worker_job({"image": IMAGE})
    pod, container, env = _check_job(config)
    assert config.namespace == config.job_manifest["metadata"]["namespace"] == "gtaseg"
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["GTASEG_REQUIRE_GPUS"] == "1"  # a job that sees no GPU stops (check_gpus)
    assert env["GTASEG_TRAIN_LAUNCHER"] == "torchrun --standalone --nnodes 1 --nproc_per_node 1"
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["serviceAccountName"] == "gtaseg-job"
    assert container["envFrom"] == [{"secretRef": {"name": "gtaseg-storage"}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert pod["terminationGracePeriodSeconds"] >= 60  # time to checkpoint and upload
    # torchrun forwards the SIGTERM to its workers and waits that long, not its own 30 s
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(pod["terminationGracePeriodSeconds"])
    assert "priorityClassName" not in pod and pod["imagePullSecrets"] == []  # cluster defaults
    assert config.pod_watch_timeout_seconds == 600


def test_k8s_template_renders_every_variable_into_a_valid_job() -> None:
    affinity = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "preference": {
                        "matchExpressions": [
                            {
                                "key": "nvidia.com/gpu.product",
                                "operator": "In",
                                "values": ["NVIDIA-H100-80GB-HBM3"],
                            }
                        ]
                    },
                }
            ]
        }
    }
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    values = {
        "image": IMAGE, "gpus": 4, "cpu": "32", "memory": "128Gi", "shm_size": "32Gi",
        "namespace": "ml", "service_account_name": "trainer", "image_pull_policy": "Always",
        "image_pull_secrets": [{"name": "regcred"}], "tolerations": tolerations,
        "affinity": affinity, "node_selector": {"pool": "h100"}, "priority_class_name": "batch-low",
        "termination_grace_period_seconds": 300, "active_deadline_seconds": 86400,
        "finished_job_ttl": 600, "storage_secret_name": "other-storage",
        "labels": {"team": "seg"}, "annotations": {"owner": "seg-team"}, "env": {"EXTRA": "1"},
        "name": "cell", "pod_watch_timeout_seconds": 900, "job_watch_timeout_seconds": 60,
    }  # fmt: skip
    config = _worker_job(values)
    pod, container, env = _check_job(config)
    spec = config.job_manifest["spec"]
    assert config.namespace == config.job_manifest["metadata"]["namespace"] == "ml"
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (86400, 600)
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == tolerations and pod["affinity"] == affinity
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["priorityClassName"] == "batch-low"
    assert pod["terminationGracePeriodSeconds"] == 300
    assert pod["serviceAccountName"] == "trainer"
    assert container["imagePullPolicy"] == "Always"
    assert container["envFrom"] == [{"secretRef": {"name": "other-storage"}}]
    assert container["resources"] == {
        "requests": {"cpu": "32", "memory": "128Gi"},
        "limits": {"memory": "128Gi", "nvidia.com/gpu": 4},
    }
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "32Gi"
    assert (env["GTASEG_REQUIRE_GPUS"], env["EXTRA"]) == ("4", "1")  # env merged, not replaced
    assert env["GTASEG_TRAIN_LAUNCHER"].endswith("--nproc_per_node 4")
    assert config.job_manifest["metadata"]["labels"]["team"] == "seg"
    assert config.job_manifest["metadata"]["annotations"] == {"owner": "seg-team"}
    assert config.job_manifest["metadata"]["generateName"] == "cell-"
    assert (config.pod_watch_timeout_seconds, config.job_watch_timeout_seconds) == (900, 60)


def test_k8s_template_requires_a_pinned_image() -> None:
    """Prefect's own job-variable validation (the server's, for a flow run) refuses a job
    without an image, or with a mutable one: a node with IfNotPresent would keep old code."""
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = _template()["variables"]

    def check(values: dict[str, Any]) -> None:
        validate(values, schema, raise_on_error=True, preprocess=True, ignore_required=False,
                 allow_none_with_default=True)  # fmt: skip

    for image in (IMAGE, "gtaseg:3f2c1ab", "registry:5000/gtaseg/train:v1.2.0",
                  "gtaseg/train@sha256:" + "a" * 64):  # fmt: skip
        check({"image": image})
    for values in ({}, {"image": "gtaseg/train:latest"}, {"image": "registry:5000/gtaseg/train"},
                   {"image": "gtaseg"}):  # fmt: skip
        with pytest.raises(ValidationError):
            check(values)


def test_pod_security_check_names_each_rule_a_pod_breaks() -> None:
    """The restricted-standard check can fail: a pod that breaks every rule is named by each."""
    bad = {
        "hostNetwork": True, "hostPID": True,
        "securityContext": {"runAsNonRoot": False, "runAsUser": 0,
                            "seccompProfile": {"type": "Unconfined"},
                            "sysctls": [{"name": "kernel.msgmax", "value": "1"}],
                            "seLinuxOptions": {"type": "spc_t"},
                            "windowsOptions": {"hostProcess": True}},
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "containers": [{
            "name": "c", "image": "x:1", "ports": [{"containerPort": 80, "hostPort": 80}],
            "securityContext": {"privileged": True, "allowPrivilegeEscalation": True,
                                "capabilities": {"add": ["SYS_ADMIN"]}, "procMount": "Unmasked",
                                "appArmorProfile": {"type": "Unconfined"}},
        }],
    }  # fmt: skip
    broken = {v.split(":")[0] for v in restricted_violations(bad)}
    assert broken == {name for name, _ in RULES}
    good = _as_stored(_worker_job({"image": IMAGE}).job_manifest)["spec"]["template"]["spec"]
    assert restricted_violations(good) == []
    for field in ("allowPrivilegeEscalation", "capabilities", "seccompProfile"):
        weaker = copy.deepcopy(good)
        del weaker["containers"][0]["securityContext"][field]
        if field == "seccompProfile":
            del weaker["securityContext"][field]
        assert restricted_violations(weaker), field


def _deployment_values(deployment: dict[str, Any]) -> dict[str, Any]:
    """A deployment's job variables as `prefect deploy` sends them (GTASEG_IMAGE resolved)."""
    values = copy.deepcopy(deployment["work_pool"]["job_variables"])
    assert values.pop("image") == "{{ $GTASEG_IMAGE }}"  # one commit-tagged image for all
    return {**values, "image": IMAGE}


def test_gpu_deployments_render_valid_jobs_and_the_sweep_runs_on_cpu_nodes() -> None:
    schema = _template()["variables"]
    gpu_deployments = {
        d["name"]: d
        for d in _prefect_yaml()["deployments"]
        if d["work_pool"]["name"] == "gtaseg-gpu"
    }
    assert gpu_deployments
    pods = {}
    for name, deployment in gpu_deployments.items():
        values = _deployment_values(deployment)
        jsonschema.validate(values, schema)
        pods[name] = _check_job(_worker_job(values))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"image": IMAGE, "gpus": -1}, schema)
    gpus = {name: c["resources"]["limits"]["nvidia.com/gpu"] for name, (_, c, _) in pods.items()}
    assert max(gpus.values()) > 1 and gpus["sweep-cluster"] == 0  # the sweep only orchestrates
    sweep, _, sweep_env = pods["sweep-cluster"]
    assert sweep_env["GTASEG_REQUIRE_GPUS"] == "0"
    assert sweep["tolerations"] == []  # kept off GPU nodes' taint...
    (term,) = sweep["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    # ...and off GPU nodes without one: the label NVIDIA's GPU feature discovery puts on them
    assert {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"} in term["matchExpressions"]


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
    entrypoint = json.loads(_dockerfile_value("ENTRYPOINT"))
    # tini -g: a SIGTERM reaches the whole process group (torchrun's workers), not only its child
    assert entrypoint[0].endswith("tini") and entrypoint[1:] == ["-g", "--"]
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


@pytest.mark.slow
def test_a_prefect_server_takes_the_pool_and_deployments_and_its_flow_runs_make_valid_jobs(
    tmp_path: Path,
) -> None:
    """End to end on a real Prefect server: the pool created from the template, the GPU
    deployments of prefect.yaml deployed with `prefect deploy`, a flow run of each resolved by
    prefect-kubernetes' job configuration as its worker does (`resolve_for_flow_run`: the pool's
    stored template, the deployment's and the flow run's job variables) into a valid restricted
    Job; a mutable image refused by the server at deploy time and at flow-run time."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
    from servers import prefect_server

    server = prefect_server(tmp_path / "prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "client"), "GTASEG_IMAGE": IMAGE}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, text=True,
                              env={**env, "PREFECT_API_URL": server.url},
                              capture_output=True, timeout=300)  # fmt: skip

    async def resolve_each(names: list[str]) -> list[Any]:
        async with get_client() as client:
            pool = await client.read_work_pool("gtaseg-gpu")
            configs = []
            for name in names:
                deployment = await client.read_deployment_by_name(name)
                flow_run = await client.create_flow_run_from_deployment(deployment.id)
                with temporary_settings({PREFECT_API_URL: IN_CLUSTER_API}):  # the worker's
                    configs.append(
                        await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                            flow_run, client=client, work_pool=pool, worker_name="gpu-worker"
                        )
                    )
            mutable = {"image": "gtaseg/train:latest"}
            with pytest.raises(Exception, match="does not match"):  # a deployment of it
                await client.create_deployment(
                    deployment.flow_id, "mutable", work_pool_name="gtaseg-gpu",
                    job_variables=mutable,
                )  # fmt: skip
            with pytest.raises(Exception, match="does not match"):  # a flow run with it
                await client.create_flow_run_from_deployment(deployment.id, job_variables=mutable)
            return configs

    server.launch()
    try:
        server.wait_healthy()
        pool = cli("work-pool", "create", "gtaseg-gpu", "--type", "kubernetes",
                   "--base-job-template", str(TEMPLATE))  # fmt: skip
        assert pool.returncode == 0, pool.stdout + pool.stderr
        names = ["train-gpu", "train-gpu-x4", "sweep-cluster"]
        deploy = cli("--no-prompt", "deploy", *(f"--name={n}" for n in names))
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        with temporary_settings({PREFECT_API_URL: server.url}):
            full = [
                "gtaseg-train/train-gpu",
                "gtaseg-train/train-gpu-x4",
                "gtaseg-sweep/sweep-cluster",
            ]
            configs = asyncio.run(resolve_each(full))
    finally:
        server.stop()
    jobs = {name: _check_job(config) for name, config in zip(names, configs, strict=True)}
    limits = {name: c["resources"]["limits"]["nvidia.com/gpu"] for name, (_, c, _) in jobs.items()}
    assert limits == {"train-gpu": 1, "train-gpu-x4": 4, "sweep-cluster": 0}
    assert all(c["image"] == IMAGE for _, c, _ in jobs.values())
