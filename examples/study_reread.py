"""The figures of docs/study-reread.md from a results directory of examples/study-reread.yaml.

    python examples/study_reread.py results/study-reread

Prints Markdown tables: for each layer pair the study's statements are about, the observed
mean over images with its bootstrap interval, the spatial null (mean, p95), the untrained
baseline (mean, p95 over the initialisations), and the share of maps whose best partner is
significant against the null (Benjamini-Hochberg, q < 0.05).
"""

from __future__ import annotations

import sys

import pandas as pd

import mapsim

#: (section, [(model_a, layer_a, model_b, layer_b)])
ROWS = [
    ("First layers", [("cnn1", "L1", "cnn1", "L1"), ("cnn6", "L1", "cnn6", "L1"),
                      ("cnn10", "L1", "cnn10", "L1")]),
    ("CNN6 layer by layer (each layer with itself)",
     [("cnn6", x, "cnn6", x) for x in ("L1", "L2", "L4", "L6")]),
    ("CNN10 layer by layer (each layer with itself)",
     [("cnn10", x, "cnn10", x) for x in ("L1", "L2", "L4", "L6", "L8", "L10")]),
    ("CNN10's last layers with each other",
     [("cnn10", "L8", "cnn10", "L10"), ("cnn10", "L10", "cnn10", "L8"),
      ("cnn10", "L6", "cnn10", "L8"), ("cnn10", "L2", "cnn10", "L4")]),
    ("Between networks and seeds",
     [("cnn1", "L1", "cnn6", "L1"), ("cnn6", "L1", "cnn10", "L1"), ("cnn6", "L6", "cnn10", "L10"),
      ("cnn6", "L1", "cnn6-s2", "L1"), ("cnn6", "L6", "cnn6-s2", "L6"),
      ("cnn10", "L1", "cnn10-s2", "L1"), ("cnn10", "L10", "cnn10-s2", "L10")]),
]


def _cell(value: float, digits: int) -> str:
    return "n/a" if pd.isna(value) else f"{value:.{digits}f}"


def table(res: mapsim.Results, statistic: str, pairs: list[tuple[str, str, str, str]]) -> str:
    """One Markdown table of ``statistic`` (best_mean or pct_well) for ``pairs``."""
    digits = 3 if statistic == "best_mean" else 1
    summary, base, pv = res.summary, res.baselines, res.map_pvalues
    lines = [("| layer pair | observed [95 % CI] | spatial null mean / p95 | untrained mean / p95 "
              "| above null p95 | maps significant |"), "|---|---|---|---|---|---|"]
    for a, la, b, lb in pairs:
        key = ((summary.model_a == a) & (summary.layer_a == la) & (summary.model_b == b)
               & (summary.layer_b == lb) & (summary.statistic == statistic))
        row = summary[key]
        if row.empty:
            continue
        row = row.iloc[0]
        chosen = base[(base.model_a == a) & (base.layer_a == la) & (base.model_b == b)
                      & (base.layer_b == lb) & (base.statistic == statistic)]
        null = chosen[chosen.baseline == "spatial-null"]
        untrained = chosen[chosen.baseline == "untrained"]
        maps = pv[(pv.model_a == a) & (pv.layer_a == la) & (pv.model_b == b) & (pv.layer_b == lb)]
        share = f"{100 * maps.significant.mean():.0f} % of {len(maps)}" if len(maps) else "n/a"

        def pair(frame: pd.DataFrame) -> str:
            if frame.empty:
                return "n/a"
            return f"{_cell(frame.iloc[0]['mean'], digits)} / {_cell(frame.iloc[0]['p95'], digits)}"

        above = "n/a" if null.empty else ("yes" if bool(null.iloc[0]["above"]) else "**no**")
        lines.append(
            f"| {a} {la} → {b} {lb} | {_cell(row['mean'], digits)} [{_cell(row['ci_low'], digits)}, "
            f"{_cell(row['ci_high'], digits)}] | {pair(null)} | {pair(untrained)} | {above} | "
            f"{share} |")
    return "\n".join(lines)


def main() -> None:
    res = mapsim.open_results(sys.argv[1] if len(sys.argv) > 1 else "results/study-reread")
    print(f"{res.n_images} images\n")
    for title, pairs in ROWS:
        for statistic, name in (("pct_well", "% of maps with best |r| >= 0.8"),
                                ("best_mean", "mean best |r|")):
            print(f"#### {title}: {name}\n")
            print(table(res, statistic, pairs))
            print()


if __name__ == "__main__":
    main()
