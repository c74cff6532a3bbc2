"""Derive the training image's requirement files from the lock (same versions, fewer packages).

requirements/requirements.in lists the runtime packages, then the test / dev tools after the line
`# test / dev`. From requirements/lock.txt (uv's output, each pin followed by `# via` the packages
that need it) this writes:
    requirements/torch.txt    torch and torchvision, installed from the CUDA wheel index
                              (the Dockerfile's TORCH_INDEX_URL), with the CUDA libraries that
                              index's build pins
    requirements/runtime.txt  every other package a runtime package needs, at the lock's version:
                              no pytest, moto or ruff, and nothing only torch needs

    python scripts/runtime_requirements.py          # write both files
    python scripts/runtime_requirements.py --check  # exit 1 if they differ from the lock's subset
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
TORCH = ("torch", "torchvision")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def read_lock(path: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    """{package: pinned line}, {package: the packages (or "-r ...") it is there for}."""
    pins: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if match := _PIN.match(line):
            current = _name(match.group(1))
            pins[current] = f"{current}=={match.group(2)}"
            via[current] = set()
        elif current and (item := line.strip().removeprefix("#").strip()):
            item = item.removeprefix("via").strip()
            if item:
                via[current].add(item if item.startswith("-r") else _name(item))
    return pins, via


def runtime_roots(path: Path) -> list[str]:
    """The packages requirements.in lists before `# test / dev`."""
    roots = []
    for line in path.read_text().splitlines():
        if line.strip().lower().startswith("# test"):
            break
        if line.strip() and not line.startswith("#"):
            roots.append(_name(re.split(r"[=<>\[ ;]", line.strip())[0]))
    return roots


def closure(roots: set[str], via: dict[str, set[str]], stop: set[str]) -> set[str]:
    """`roots` and every package some member needs, never expanding through `stop`."""
    needed = set(roots)
    while True:
        more = {p for p, users in via.items() if p not in needed and users & (needed - stop)}
        if not more:
            return needed
        needed |= more


def derive() -> dict[Path, str]:
    pins, via = read_lock(REQ / "lock.txt")
    roots = set(runtime_roots(REQ / "requirements.in"))
    others = closure(roots - set(TORCH), via, stop=set(TORCH)) - set(TORCH)
    header = (
        "# Derived from requirements/lock.txt by scripts/runtime_requirements.py: do not "
        "edit.\n# {}\n"
    )
    return {
        REQ / "torch.txt": header.format(
            "torch and torchvision, from the CUDA wheel index (Dockerfile: TORCH_INDEX_URL)"
        )
        + "".join(pins[p] + "\n" for p in TORCH),
        REQ / "runtime.txt": header.format(
            "the image's other runtime packages, at the lock's versions"
        )
        + "".join(pins[p] + "\n" for p in sorted(others)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    stale = [p for p, text in derive().items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(
                f"{path.relative_to(ROOT)} differs from the lock's runtime subset: run python "
                f"scripts/runtime_requirements.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path, text in derive().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
