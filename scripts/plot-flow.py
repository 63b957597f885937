#!/usr/bin/env python3
"""Flow control on real processes, over seeds: goodput and TTFT p90 against offered load for
each setup (scripts/bench-flow.sh appends every load point to docs/bench-flow-processes.csv).

Usage: python3 scripts/plot-flow.py docs/bench-flow-processes.csv docs/flow-processes.png [SLO_MS]

Plots the mean over seeds with the lowest and highest seed as a bar, and prints a Markdown
table of the same figures (mean, and the range over seeds) for BENCHMARKS.md.
"""

import csv
import sys
from collections import defaultdict


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    slo_ms = float(sys.argv[3]) if len(sys.argv) > 3 else 2000.0
    points = defaultdict(list)
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            points[(row["setup"], float(row["load"]))].append(row)
    if not points:
        sys.exit(f"{src}: no rows")
    setups = sorted({s for s, _ in points}, key=["mesh-no-flow", "mesh-flow", "central-flow"].index)
    loads = sorted({l for _, l in points})

    def stat(setup, load, field):
        vals = [float(r[field]) for r in points.get((setup, load), [])]
        if not vals:
            return None
        return sum(vals) / len(vals), min(vals), max(vals), len(vals)

    print("| load | setup | seeds | goodput (req/s) | TTFT p90 (ms) | completed | 503 | slowest refusal (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for load in loads:
        for s in setups:
            g, p90 = stat(s, load, "goodput"), stat(s, load, "ttft_p90_ms")
            if not g:
                continue
            done, r503 = stat(s, load, "completed"), stat(s, load, "refused_503")
            slow = stat(s, load, "slowest_refusal_ms")
            print(
                f"| {load:g}x | {s} | {g[3]} | {g[0]:.1f} ({g[1]:.1f}-{g[2]:.1f}) | "
                f"{p90[0]:.0f} ({p90[1]:.0f}-{p90[2]:.0f}) | {done[0]:.0f} | {r503[0]:.0f} | {slow[2]:.0f} |"
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for s in setups:
        for ax, field in ((ax_g, "goodput"), (ax_t, "ttft_p90_ms")):
            xs, mean, lo, hi = [], [], [], []
            for load in loads:
                st = stat(s, load, field)
                if st:
                    xs.append(load)
                    mean.append(st[0] / (1000.0 if field == "ttft_p90_ms" else 1.0))
                    lo.append((st[0] - st[1]) / (1000.0 if field == "ttft_p90_ms" else 1.0))
                    hi.append((st[2] - st[0]) / (1000.0 if field == "ttft_p90_ms" else 1.0))
            ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=s)
    ax_g.set_title("Goodput (TTFT within the objective)")
    ax_g.set_xlabel("offered load (x measured capacity)")
    ax_g.set_ylabel("requests/s")
    ax_t.set_title("TTFT p90 of completed requests")
    ax_t.set_xlabel("offered load (x measured capacity)")
    ax_t.set_ylabel("seconds")
    ax_t.set_yscale("log")
    ax_t.axhline(slo_ms / 1000.0, color="grey", linestyle="--", label=f"objective {slo_ms / 1000:g} s")
    for ax in (ax_g, ax_t):
        ax.grid(alpha=0.3)
        ax.legend()
    seeds = max(len(v) for v in points.values())
    fig.suptitle(f"Flow control on 8 real processes ({seeds} seeds; mean, bars from lowest to highest seed)")
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
