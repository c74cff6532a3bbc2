"""The "restricted" Pod Security Standard, checked on a pod spec.

No Python library implements the standard, so its rules are written out here from the published
text (https://kubernetes.io/docs/concepts/security/pod-security-standards/, the policies of the
`baseline` profile, which `restricted` includes, and those `restricted` adds), one function per
rule, named as the standard names it. The API server's admission plugin applies the same rules
to a namespace labelled `pod-security.kubernetes.io/enforce: restricted`; this copy lets the tests
reject a manifest before a cluster does. Windows-only and annotation-only fields that no manifest
here uses are covered where the standard names them on the pod spec (hostProcess, AppArmor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Pod = dict[str, Any]

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def _containers(pod: Pod) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _ctx(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("securityContext") or {}


def host_process(pod: Pod) -> Iterator[str]:
    contexts = [pod.get("securityContext") or {}, *map(_ctx, _containers(pod))]
    if any((c.get("windowsOptions") or {}).get("hostProcess") for c in contexts):
        yield "windowsOptions.hostProcess must be unset or false"


def host_namespaces(pod: Pod) -> Iterator[str]:
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            yield f"{key} must be unset or false"


def privileged_containers(pod: Pod) -> Iterator[str]:
    for c in _containers(pod):
        if _ctx(c).get("privileged"):
            yield f"container {c['name']}: privileged must be unset or false"


def capabilities_baseline(pod: Pod) -> Iterator[str]:
    for c in _containers(pod):
        added = set((_ctx(c).get("capabilities") or {}).get("add") or [])
        if extra := added - BASELINE_CAPABILITIES:
            yield f"container {c['name']}: adds capabilities beyond the baseline: {sorted(extra)}"


def host_path_volumes(pod: Pod) -> Iterator[str]:
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            yield f"volume {volume['name']}: hostPath volumes are forbidden"


def host_ports(pod: Pod) -> Iterator[str]:
    for c in _containers(pod):
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                yield f"container {c['name']}: hostPort must be unset or 0"


def app_armor(pod: Pod) -> Iterator[str]:
    contexts = [pod.get("securityContext") or {}, *map(_ctx, _containers(pod))]
    for ctx in contexts:
        kind = (ctx.get("appArmorProfile") or {}).get("type")
        if kind not in (None, "RuntimeDefault", "Localhost"):
            yield f"appArmorProfile.type {kind!r} must be RuntimeDefault or Localhost"


def selinux(pod: Pod) -> Iterator[str]:
    contexts = [pod.get("securityContext") or {}, *map(_ctx, _containers(pod))]
    for ctx in contexts:
        options = ctx.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            yield f"seLinuxOptions.type {options['type']!r} is not allowed"
        if options.get("user") or options.get("role"):
            yield "seLinuxOptions.user and .role must be unset"


def proc_mount(pod: Pod) -> Iterator[str]:
    for c in _containers(pod):
        if _ctx(c).get("procMount", "Default") != "Default":
            yield f"container {c['name']}: procMount must be unset or Default"


def seccomp_baseline(pod: Pod) -> Iterator[str]:
    contexts = [pod.get("securityContext") or {}, *map(_ctx, _containers(pod))]
    if any((ctx.get("seccompProfile") or {}).get("type") == "Unconfined" for ctx in contexts):
        yield "seccompProfile.type must not be Unconfined"


def sysctls(pod: Pod) -> Iterator[str]:
    for sysctl in (pod.get("securityContext") or {}).get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            yield f"sysctl {sysctl['name']} is not in the safe set"


def volume_types(pod: Pod) -> Iterator[str]:
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            yield f"volume {volume['name']}: type {sorted(kinds)} is not allowed"


def privilege_escalation(pod: Pod) -> Iterator[str]:
    for c in _containers(pod):
        if _ctx(c).get("allowPrivilegeEscalation") is not False:
            yield f"container {c['name']}: allowPrivilegeEscalation must be false"


def running_as_non_root(pod: Pod) -> Iterator[str]:
    pod_level = (pod.get("securityContext") or {}).get("runAsNonRoot")
    if pod_level is False:
        yield "securityContext.runAsNonRoot must not be false"
    for c in _containers(pod):
        own = _ctx(c).get("runAsNonRoot")
        if own is False or (own is None and pod_level is not True):
            yield f"container {c['name']}: runAsNonRoot must be true (pod or container)"


def running_as_non_root_user(pod: Pod) -> Iterator[str]:
    contexts = [pod.get("securityContext") or {}, *map(_ctx, _containers(pod))]
    if any(ctx.get("runAsUser") == 0 for ctx in contexts):
        yield "runAsUser must not be 0"


def seccomp(pod: Pod) -> Iterator[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod_type = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    if pod_type is not None and pod_type not in allowed:
        yield f"pod seccompProfile.type {pod_type!r} must be RuntimeDefault or Localhost"
    for c in _containers(pod):
        own = (_ctx(c).get("seccompProfile") or {}).get("type")
        if (own or pod_type) not in allowed:
            yield f"container {c['name']}: seccompProfile.type must be RuntimeDefault or Localhost"


def capabilities_restricted(pod: Pod) -> Iterator[str]:
    for c in _containers(pod):
        caps = _ctx(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            yield f"container {c['name']}: capabilities.drop must include ALL"
        if extra := set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            yield f"container {c['name']}: may add only NET_BIND_SERVICE, adds {sorted(extra)}"


# (policy name as the standard writes it, its check), baseline's first
RULES: list[tuple[str, Callable[[Pod], Iterator[str]]]] = [
    ("HostProcess", host_process),
    ("Host Namespaces", host_namespaces),
    ("Privileged Containers", privileged_containers),
    ("Capabilities (baseline)", capabilities_baseline),
    ("HostPath Volumes", host_path_volumes),
    ("Host Ports", host_ports),
    ("AppArmor", app_armor),
    ("SELinux", selinux),
    ("/proc Mount Type", proc_mount),
    ("Seccomp (baseline)", seccomp_baseline),
    ("Sysctls", sysctls),
    ("Volume Types", volume_types),
    ("Privilege Escalation", privilege_escalation),
    ("Running as Non-root", running_as_non_root),
    ("Running as Non-root user", running_as_non_root_user),
    ("Seccomp", seccomp),
    ("Capabilities", capabilities_restricted),
]


def restricted_violations(pod: Pod) -> list[str]:
    """Every way `pod` (a PodSpec) breaks the restricted standard, each prefixed by its rule."""
    return [f"{name}: {problem}" for name, check in RULES for problem in check(pod)]


def pod_spec_of(manifest: dict[str, Any]) -> Pod | None:
    """The PodSpec a workload manifest makes pods from (None for a kind that makes none)."""
    kind = manifest["kind"]
    if kind == "Pod":
        return manifest["spec"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return manifest["spec"]["template"]["spec"]
    if kind == "CronJob":
        return manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None
