#!/usr/bin/env bash
# gtaseg's one entry point: sets up the pinned environment on first use, then runs a task.
#   bash scripts/run.sh demo    the whole pipeline on the dataset params.yaml names (dvc repro;
#                               extra arguments go to dvc repro)
#   bash scripts/run.sh test    the test suite (what CI runs), over GTASEG_TEST_WORKERS pytest
#                               workers (default: cores + 1; -n 0 after `test`: one process)
#   bash scripts/run.sh env     only set up the environment
#   bash scripts/run.sh -- CMD  run CMD inside the environment (e.g. -- gtaseg --help)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
# One virtual environment per checkout (.venv beside the code, as uv and poetry make it): two
# clones on one machine never import each other's code.
venv="${GTASEG_VENV:-$here/.venv}"
lock="requirements/lock.txt"
stamp="$venv/.gtaseg-lock"
# The stamp covers the lock, pyproject and this checkout's path: a changed lock reinstalls, and a
# moved checkout re-points its editable install (seconds).
want="$( (sha256sum "$lock" pyproject.toml; echo "$here") | sha256sum | cut -c1-16)"

ensure_env() {
  if [ ! -x "$venv/bin/python" ]; then
    echo "[gtaseg] creating virtual environment at $venv (first run: ~5 minutes)" >&2
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[gtaseg] installing the pinned lock $lock" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$lock"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

ensure_env
export PATH="$venv/bin:$PATH"
# Project-wide runtime settings (.env.defaults; a value already in the environment wins).
while IFS='=' read -r key value; do
  case "$key" in ''|'#'*) continue ;; esac
  # GTASEG_MALLOC=system keeps glibc's own malloc defaults (gtaseg.startup.MALLOC_SETTINGS)
  case "$key:${GTASEG_MALLOC:-}" in MALLOC_*:system) continue ;; esac
  [ -n "${!key+x}" ] || export "$key=$value"
done < "$here/.env.defaults"

task="${1:-help}"; shift || true
case "$task" in
  env) echo "[gtaseg] environment ready: $venv" ;;
  demo) exec dvc repro "$@" ;;
  # One worker more than the cores: a worker waiting on a server, a subprocess or a disk flush
  # leaves its core to another. Whole test files per worker (--dist loadfile): a module's servers
  # and runs start once; the longest files first, in the order tests/conftest.py gives them
  # (--no-loadscope-reorder).
  test) exec python -m pytest -q -n "${GTASEG_TEST_WORKERS:-$(( $(nproc) + 1 ))}" \
    --dist loadfile --no-loadscope-reorder "$@" ;;
  --) exec "$@" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
