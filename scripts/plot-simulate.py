#!/usr/bin/env python3
"""Plot `kvmesh simulate --csv` results against cluster size: TTFT p90 per policy, and gossip
bandwidth per node for kvmesh (flat and in cells, with the cells' gateways).

Usage: python3 scripts/plot-simulate.py OUT.png LABEL=CSV [LABEL=CSV ...]
Each CSV is one `kvmesh simulate` run (e.g. `default=sizes.csv budget=sizes-budget.csv`); its
kvmesh rows are labelled `kvmesh (LABEL)`, the baselines are taken from the first CSV.
Needs matplotlib (pip install matplotlib).
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    ttft, gossip = defaultdict(list), defaultdict(list)
    for i, (label, path) in enumerate(runs):
        with open(path) as f:
            for r in csv.DictReader(f):
                n, p = int(r["nodes"]), r["policy"]
                if p in ("kvmesh", "kvmesh-cells"):
                    name = f"{p} ({label})"
                    gossip[name].append((n, float(r["gossip_kb_s"])))
                    if float(r.get("gateway_kb_s") or 0) > 0:
                        gossip[f"{p} gateways ({label})"].append((n, float(r["gateway_kb_s"])))
                elif i > 0:
                    continue
                else:
                    name = p
                ttft[name].append((n, float(r["ttft_p90_ms"]) / 1000.0))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, pts in sorted(ttft.items()):
        pts.sort()
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("nodes (one simulated H100 engine each)")
    a.set_ylabel("TTFT p90 (s)")
    a.set_title("shared-prefix at 5 req/s per engine")
    a.grid(True, which="both", alpha=0.3)
    a.legend()
    for name, pts in sorted(gossip.items()):
        pts.sort()
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    b.axhline(100, color="grey", linestyle="--", label="100 KB/s")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("nodes")
    b.set_ylabel("gossip KB/s per node (modelled)")
    b.set_title("gossip bandwidth")
    b.grid(True, which="both", alpha=0.3)
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
