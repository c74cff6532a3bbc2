"""benchmarks/quality_worst_case.py against hand-worked gains: each method minus supervised of the
same dataset, ratio and seed; oracle twins and full-label runs left out."""

from __future__ import annotations

from benchmark_scripts import load


def _row(ratio: str, method: str, seed: str, best: float) -> dict[str, str]:
    return {"dataset": "d", "ratio": ratio, "method": method, "seed": seed, "best": str(best)}


def test_worst_cell_mean_gain_and_cells_ahead():
    rows = [
        _row("1_16", "supervised", "0", 0.40),
        _row("1_16", "supervised", "1", 0.50),
        _row("1_16", "gta", "0", 0.43),  # +3
        _row("1_16", "gta", "1", 0.49),  # -1
        _row("1_16", "gta+oracle", "0", 0.90),  # a diagnostic: not a cell
        _row("full", "supervised", "0", 0.60),
        _row("1_4", "gta", "0", 0.70),  # no supervised run of that ratio: not a cell
    ]
    worst = load("quality_worst_case")
    per_method = worst.gains(rows)
    assert set(per_method) == {"gta"}
    assert sorted(round(g, 6) for g, _ in per_method["gta"]) == [-1.0, 3.0]
    text = worst.table(per_method)
    assert "| gta | -1.00 (d 1_16 seed 1) | +1.00 | 1 of 2 |" in text
