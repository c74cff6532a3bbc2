"""The operator's manifests (infra/k8s/): every object valid against the Kubernetes API schema
(kubernetes-validate, strict, the oldest version the project supports and the newest), every pod
within the "restricted" Pod Security Standard (tests/pod_security.py), and the pieces wired to
each other: services and ports that the addresses name, secrets and keys that pods read, the
worker's rights, images pinned to the lock's versions or to a commit. No cluster runs here: see
infra/README.md for what stays unproven.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from pod_security import pod_spec_of, restricted_violations

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
# the oldest Kubernetes supported, and the newest schema kubernetes-validate ships
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
NAMESPACE = "gtaseg"
SECRETS = K8S / "secrets.example.yaml"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _applied() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k infra/k8s` creates: the kustomization's resources with its
    namespace and image settings applied (kustomize's own semantics for these two fields)."""
    kustomization = _kustomization()
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    objects = []
    for name in kustomization["resources"]:
        for doc in _documents(K8S / name):
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            pod = pod_spec_of(doc)
            for container in (pod or {}).get("containers", []):
                container["image"] = images.get(container["image"], container["image"])
            objects.append(doc)
    return objects


def _all_objects() -> list[dict[str, Any]]:
    return [*_applied(), *_documents(SECRETS)]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in _all_objects() if o["kind"] == kind}


def _lock_version(package: str) -> str:
    (line,) = [
        line
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if line.startswith(f"{package}==")
    ]
    return line.split("==")[1]


def test_every_manifest_is_a_valid_object_and_every_pod_restricted() -> None:
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {p.name for p in files} == {*_kustomization()["resources"], SECRETS.name}
    pods = 0
    for path in files:
        for doc in _documents(path):
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    name = f"{doc['kind']}/{doc['metadata']['name']}"
                    pytest.fail(f"{path.name} {name} (Kubernetes {version}): {exc.message}")
            if (pod := pod_spec_of(doc)) is not None:
                assert restricted_violations(pod) == [], f"{path.name} {doc['metadata']['name']}"
                pods += 1
    assert pods == 4  # postgres, prefect-server, mlflow, worker


def test_the_namespace_enforces_the_restricted_standard() -> None:
    (namespace,) = _by_kind("Namespace").values()
    labels = namespace["metadata"]["labels"]
    assert namespace["metadata"]["name"] == NAMESPACE == _kustomization()["namespace"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(o["metadata"].get("namespace", NAMESPACE) == NAMESPACE for o in _all_objects())
    template = json.loads((ROOT / "infra" / "k8s-job-template.json").read_text())
    assert template["variables"]["properties"]["namespace"]["default"] == NAMESPACE


def _images() -> dict[str, str]:
    return {
        c["name"]: c["image"]
        for o in _applied()
        if (pod := pod_spec_of(o))
        for c in pod["containers"]
    }


def test_images_are_pinned_to_the_locks_versions_or_a_commit() -> None:
    images = _images()
    assert images["prefect-server"] == f"prefecthq/prefect:{_lock_version('prefect')}-python3.11"
    assert images["mlflow"] == f"ghcr.io/mlflow/mlflow:v{_lock_version('mlflow')}-full"
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", images["postgres"])
    # the worker runs the gtaseg image (kustomization: the commit's tag), whose prefect and
    # prefect-kubernetes are the lock's
    template = json.loads((ROOT / "infra" / "k8s-job-template.json").read_text())
    assert re.fullmatch(template["variables"]["properties"]["image"]["pattern"], images["worker"])
    runtime = (ROOT / "requirements" / "runtime.txt").read_text().splitlines()
    for package in ("prefect", "prefect-kubernetes"):
        assert f"{package}=={_lock_version(package)}" in runtime
    assert not any(
        i.endswith(":latest") or ":" not in i.rsplit("/", 1)[-1] for i in images.values()
    )


def _env_values(pod: dict[str, Any]) -> list[str]:
    return [e["value"] for c in pod["containers"] for e in c.get("env", []) if "value" in e]


def test_addresses_are_in_cluster_service_names_with_their_ports() -> None:
    services = {
        f"{name}.{NAMESPACE}.svc.cluster.local": {p["port"] for p in s["spec"]["ports"]}
        for name, s in _by_kind("Service").items()
    }
    values = [v for s in _by_kind("Secret").values() for v in s["stringData"].values()]
    values += [v for o in _applied() if (pod := pod_spec_of(o)) for v in _env_values(pod)]
    urls = [urlparse(v) for v in values if "://" in v]
    assert not any(u.hostname in ("127.0.0.1", "localhost", "0.0.0.0") for u in urls)
    internal = [u for u in urls if u.hostname and u.hostname.endswith(".svc.cluster.local")]
    for url in internal:
        assert url.port in services.get(url.hostname, ()), f"no service port for {url.geturl()}"
    named = {u.hostname.split(".")[0] for u in internal}
    assert {"prefect-server", "mlflow", "postgres"} <= named
    storage = _by_kind("Secret")["gtaseg-storage"]["stringData"]
    assert urlparse(storage["MLFLOW_TRACKING_URI"]).hostname.startswith("mlflow.")


def test_services_reach_their_pods_and_pods_find_their_secrets() -> None:
    secrets = {name: set(s["stringData"]) for name, s in _by_kind("Secret").items()}
    config_maps = set(_by_kind("ConfigMap"))
    workloads = [o for o in _applied() if pod_spec_of(o) is not None]
    for service in _by_kind("Service").values():
        selector = service["spec"]["selector"].items()
        (target,) = [
            w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {p["name"] for c in pod_spec_of(target)["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    for workload in workloads:
        pod = pod_spec_of(workload)
        for container in pod["containers"]:
            for item in container.get("env", []):
                if ref := item.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["key"] in secrets[ref["name"]], ref
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
    template = json.loads((ROOT / "infra" / "k8s-job-template.json").read_text())
    assert template["variables"]["properties"]["storage_secret_name"]["default"] in secrets


def test_the_worker_may_do_what_prefect_kubernetes_does_and_jobs_nothing() -> None:
    """Create, watch and delete Jobs (a cancelled flow run deletes its Job), watch pods and read
    their logs, in its namespace only (a Role; the observer watches that namespace)."""
    worker = next(
        o
        for o in _applied()
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "gtaseg-worker"
    )
    pod = pod_spec_of(worker)
    (binding,) = _by_kind("RoleBinding").values()
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "gtaseg-worker"}  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    granted = {
        (group, resource, verb)
        for rule in _by_kind("Role")["gtaseg-worker"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    needed |= {("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
    assert needed <= granted
    assert not _by_kind("ClusterRole") and not _by_kind("ClusterRoleBinding")
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE
    assert pod["containers"][0]["args"][:3] == ["prefect", "worker", "start"]
    assert "--pool=gtaseg-gpu" in pod["containers"][0]["args"]
    # the jobs' account: bound to nothing, no token
    template = json.loads((ROOT / "infra" / "k8s-job-template.json").read_text())
    job_account = template["variables"]["properties"]["service_account_name"]["default"]
    assert _by_kind("ServiceAccount")[job_account]["automountServiceAccountToken"] is False
    assert all(
        s["name"] != job_account for b in _by_kind("RoleBinding").values() for s in b["subjects"]
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_what_the_tests_check() -> None:
    """Where kubectl is installed, its kustomize gives the objects `_applied` models."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    modelled = {(d["kind"], d["metadata"]["name"]): d for d in _applied()}
    assert rendered.keys() == modelled.keys()
    for key, doc in rendered.items():
        assert doc["metadata"].get("namespace") == modelled[key]["metadata"].get("namespace")
        if (pod := pod_spec_of(doc)) is not None:
            assert [c["image"] for c in pod["containers"]] == [
                c["image"] for c in pod_spec_of(modelled[key])["containers"]
            ]
