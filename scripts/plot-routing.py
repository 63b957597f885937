#!/usr/bin/env python3
"""Plot TTFT p90 versus request rate per routing policy from `kvmesh bench routing --csv`.

Usage: python3 scripts/plot-routing.py bench-routing.csv docs/routing-ttft-p90.png
Needs matplotlib (pip install matplotlib).
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, out = sys.argv[1], sys.argv[2]
    series = defaultdict(list)
    with open(src) as f:
        for row in csv.DictReader(f):
            series[row["policy"]].append((float(row["rate"]), float(row["ttft_p90_ms"]) / 1000.0))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("TTFT p90 (s)")
    ax.set_yscale("log")
    ax.set_title("shared-prefix workload, 8 simulated H100 engines")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
