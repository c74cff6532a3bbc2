"""Real servers on loopback for the tests: a free port; `mlflow server`, `prefect server`, moto's
S3 server and Prefect process workers as subprocesses (each its own process group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` subprocess (own process group) on a fixed port and sqlite store."""

    def __init__(
        self, root: Path, artifacts: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        """`artifacts`: where the server keeps artifacts (default: a folder in `root`; an s3://
        URI needs the S3 endpoint and credentials in `env`)."""
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{root / 'server.db'}"
        self.artifacts = artifacts or str(root / "artifacts")
        self.env = env or {}
        self.process: subprocess.Popen | None = None

    def launch(self) -> None:
        """Start the process and return at once (it boots while the caller goes on)."""
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.store,
            "--artifacts-destination",
            self.artifacts,
        ]
        env = {**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        self.kill()
        pytest.fail(f"mlflow server on port {self.port} not healthy after {timeout_s} s")

    def start(self, timeout_s: float = 150.0) -> None:
        self.launch()
        self.wait_healthy(timeout_s)

    def ensure_up(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and its uvicorn workers): a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class Service:
    """A server subprocess (own process group, log file in `root`) with an HTTP health check."""

    def __init__(self, name: str, root: Path, command: list[str], health: str,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name, self.root, self.command, self.health = name, root, command, health
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def launch(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=self.root, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{tail}")
            try:
                if requests.get(self.health, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"{self.name} not healthy at {self.health} after {timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            kill_tree(self.process.pid)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        """Kill it (a crash) and start it again on the same port, with the same data."""
        self.stop()
        self.launch()
        self.wait_healthy()


def moto_server(root: Path) -> Service:
    """moto's S3 server (server mode: a separate process, as a real S3 endpoint is)."""
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    service = Service("moto", root, cmd, f"http://127.0.0.1:{port}/moto-api/")
    service.url = f"http://127.0.0.1:{port}"
    return service


def prefect_server(root: Path) -> Service:
    """A Prefect API server with its own database in `root`."""
    port = free_port()
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    env = {
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # concurrency leases on disk, not in memory: a restarted server still knows who holds
        # a slot (else the slots held across a restart are never released)
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage"
        ".filesystem",
    }
    service = Service("prefect", root, cmd, f"http://127.0.0.1:{port}/api/health", env)
    service.url = f"http://127.0.0.1:{port}/api"
    return service


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (a machine dying under them)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
