#!/usr/bin/env python3
"""Summarizes `kvmesh bench routing --csv` runs of several setups and seeds against the central
oracle's runs of the same rate and seed (`scripts/bench-agreement.sh`).

    agreement-table.py CSV... [--out BENCHMARKS.md --section NAME] [--title T] [--command CMD]

For each rate and setup: the mean over seeds of cache hit, TTFT p50/p90/p99 and goodput, and
the ratios to the oracle paired by seed (mean, and the worst seed's).
"""
import argparse
import csv
import os
import statistics
from collections import defaultdict

from bench_sections import write_section


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csvs", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--section", default="agreement-processes")
    ap.add_argument("--title", default="Routers that agree when caches are full")
    ap.add_argument("--command", default="")
    a = ap.parse_args()
    runs = []
    for path in a.csvs:
        with open(path, newline="") as f:
            runs += list(csv.DictReader(f))
    by = defaultdict(list)  # (rate, policy) -> rows
    oracle = {}  # (rate, seed) -> row
    for r in runs:
        key = (round(float(r["rate"]), 2), r["policy"])
        by[key].append(r)
        if r["policy"] == "oracle":
            oracle[(key[0], r["seed"])] = r
    lines = [
        f"## {a.title}",
        "",
        f"Command: `{a.command}`. Means over seeds {', '.join(sorted({r['seed'] for r in runs}, key=int))}; ratios to the "
        "oracle are paired by seed (mean, then the worst seed in brackets). The oracle is one `kvmesh serve` "
        "router over the 8 engine processes, reading each engine's KV events and load; SMG is "
        "`smg launch --policy cache_aware` (PyPI `sglang-router`) over the same engines. All processes and the "
        f"load generator share this machine's {os.cpu_count()} cores.",
        "",
        "| rate (req/s) | setup | seeds | cache hit | hit / oracle | TTFT p50 | TTFT p90 | TTFT p99 | p90 / oracle | "
        "goodput (req/s) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"oracle": 0, "kvmesh": 1, "kvmesh-random": 2, "smg": 3, "least-load": 4}
    for (rate, policy) in sorted(by, key=lambda k: (k[0], order.get(k[1], 9), k[1])):
        rs = by[(rate, policy)]
        mean = lambda k: statistics.mean(float(r[k]) for r in rs)
        hit_ratio, p90_ratio = [], []
        for r in rs:
            o = oracle.get((rate, r["seed"]))
            if o is None or policy == "oracle":
                continue
            if float(o["hit_rate"]) > 0:
                hit_ratio.append(float(r["hit_rate"]) / float(o["hit_rate"]))
            if float(o["ttft_p90_ms"]) > 0:
                p90_ratio.append(float(r["ttft_p90_ms"]) / float(o["ttft_p90_ms"]))
        ratio = lambda xs, worst: f"{statistics.mean(xs):.2f} ({worst(xs):.2f})" if xs else "-"
        lines.append(
            f"| {rate:g} | {policy} | {len(rs)} | {mean('hit_rate') * 100:.1f}% | {ratio(hit_ratio, min)} | "
            f"{mean('ttft_p50_ms'):.0f} ms | {mean('ttft_p90_ms'):.0f} ms | {mean('ttft_p99_ms'):.0f} ms | "
            f"{ratio(p90_ratio, max)} | {mean('goodput'):.1f} | {sum(int(r['failed']) for r in rs)} |"
        )
    body = "\n".join(lines)
    print(body)
    if a.out:
        write_section(a.out, a.section, body)


if __name__ == "__main__":
    main()
