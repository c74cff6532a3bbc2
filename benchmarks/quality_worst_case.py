"""Each method's worst case against supervised training, from a quality run's `runs.csv`.

    python benchmarks/quality_worst_case.py benchmarks/results/quality_oracle

For every (dataset, ratio, seed) cell where both ran, the method's best student mIoU minus the
supervised run's of the same seed (same split, same warm-up). Writes `worst_case.md` beside the
CSV: per method the worst cell, the mean gain, and in how many cells it is ahead. Defaults are
chosen by the worst cell, not the mean: quality is judged on data nobody measured.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def gains(rows: list[dict[str, str]]) -> dict[str, list[tuple[float, str]]]:
    """Per method: (gain in points, 'dataset ratio seed') over the cells supervised also ran."""
    key = ("dataset", "ratio", "method", "seed")
    best = {tuple(r[k] for k in key): 100 * float(r["best"]) for r in rows}
    out: dict[str, list[tuple[float, str]]] = {}
    for (dataset, ratio, method, seed), value in best.items():
        base = best.get((dataset, ratio, "supervised", seed))
        if method == "supervised" or ratio == "full" or base is None or "+" in method:
            continue
        out.setdefault(method, []).append((value - base, f"{dataset} {ratio} seed {seed}"))
    return out


def table(per_method: dict[str, list[tuple[float, str]]]) -> str:
    lines = [
        "Best student mIoU minus supervised's, same dataset, ratio and seed (points).",
        "",
        "| method | worst cell | mean gain | cells ahead |",
        "|---|---|---|---|",
    ]
    for method, cells in per_method.items():
        worst = min(cells)
        mean = sum(g for g, _ in cells) / len(cells)
        ahead = sum(g > 0 for g, _ in cells)
        lines.append(
            f"| {method} | {worst[0]:+.2f} ({worst[1]}) | {mean:+.2f} | {ahead} of {len(cells)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a benchmarks/quality.py --out folder")
    args = ap.parse_args()
    with (args.folder / "runs.csv").open() as fh:
        text = table(gains(list(csv.DictReader(fh))))
    (args.folder / "worst_case.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
