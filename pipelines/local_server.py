"""Run a command with one local Prefect API server for all of its flow runs.

    python -m pipelines.local_server dvc repro

Without PREFECT_API_URL, every `python -m pipelines.flows ...` process (each DVC train stage)
would start its own temporary server (tens of seconds each on a small machine). This starts one
`prefect server start` on loopback, points the command at it, and stops it afterwards. With
PREFECT_API_URL already set, the command simply runs against that server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_prefect_server(home: Path | None = None, timeout_s: float = 180.0) -> Iterator[str]:
    """Start `prefect server start` on 127.0.0.1 and yield its API URL; stop it on exit."""
    port = _free_port()
    env = dict(os.environ)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_UI_ENABLED"] = "false"
    log = tempfile.NamedTemporaryFile("w+", prefix="prefect-server-", suffix=".log")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-2000:]
                raise RuntimeError(
                    f"the local Prefect server did not start within {timeout_s:.0f} s (exit code "
                    f"{proc.poll()}); set PREFECT_API_URL to a running server instead. Its log:\n"
                    f"{tail}"
                )
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.call(argv)
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    with local_prefect_server(timeout_s=timeout) as url:
        print(f"[gtaseg] Prefect API server at {url} for: {' '.join(argv)}", file=sys.stderr)
        return subprocess.call(argv, env={**os.environ, "PREFECT_API_URL": url})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
