#!/usr/bin/env python3
"""Puts the cluster simulator's figures beside the real-process routing benchmark's.

    compare-simulator.py SIM_CSV REAL_CSV... [--out BENCHMARKS.md] [--command CMD]

SIM_CSV is `kvmesh simulate --csv`, each REAL_CSV `kvmesh bench routing --csv` (8 nodes). The
table goes to stdout and, with --out, into the file's `simulate-validation` section.
"""
import argparse
import csv

from bench_sections import write_section


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sim")
    ap.add_argument("real", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--command", default="")
    ap.add_argument("--workload", default="examples/workloads/shared-prefix.toml")
    a = ap.parse_args()
    sim = {(round(float(r["rate"]), 1), r["policy"]): r for r in rows(a.sim)}
    name = a.workload.rsplit("/", 1)[-1].removesuffix(".toml")
    lines = [
        f"## The cluster simulator against real processes ({name}, 8 nodes)",
        "",
        f"Command: `{a.command}`. Real: 8 separate `kvmesh serve` processes on loopback (the oracle: one "
        "router in front of 8 `kvmesh engine-sim` processes), the load generator in another, all on this "
        "machine's 2 cores. Simulated: `kvmesh simulate` with the same workload, rates and duration. "
        "Ratio: simulated / real.",
        "",
        "| rate (req/s) | policy | real TTFT p50 / p90 / p99 | simulated TTFT p50 / p90 / p99 | ratio p50 / p90 / p99 | "
        "real hit | simulated hit |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for path in a.real:
        for r in rows(path):
            key = (round(float(r["rate"]), 1), r["policy"])
            s = sim.get(key)
            if s is None:
                continue
            q = ["ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"]
            real = [float(r[k]) for k in q]
            simv = [float(s[k]) for k in q]
            ratio = [x / y if y else float("nan") for x, y in zip(simv, real)]
            worst = max(worst, abs(ratio[1] - 1))
            lines.append(
                f"| {key[0]:g} | {key[1]} | {' / '.join(f'{v:.0f}' for v in real)} ms | "
                f"{' / '.join(f'{v:.0f}' for v in simv)} ms | {' / '.join(f'{v:.2f}' for v in ratio)} | "
                f"{float(r['hit_rate']) * 100:.0f}% | {float(s['hit_rate']) * 100:.0f}% |"
            )
    lines += ["", f"Largest TTFT p90 difference: {worst * 100:.0f}%."]
    body = "\n".join(lines)
    print(body)
    real = real_table(a, name)
    print(real)
    if a.out:
        write_section(a.out, "simulate-validation" + ("" if name == "shared-prefix" else f"-{name}"), body)
        write_section(a.out, f"routing-processes-{name}", real)


def real_table(a, name):
    """The real runs' figures, as `bench routing` prints them."""
    out = [
        f"## Routing on real processes ({name}, 8 nodes)",
        "",
        f"Command: `{a.command}` (its real runs). 8 separate `kvmesh serve` processes on loopback, meshed "
        "over QUIC with mutual TLS, each with its embedded engine simulator (the oracle: one `kvmesh serve` "
        f"router in front of 8 `kvmesh engine-sim` processes); the load generator in another process; workload "
        f"`{a.workload}`; all on this machine's 2 cores. Each point on fresh processes.",
        "",
        "| rate (req/s) | policy | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | output tok/s | "
        "cache hit | goodput (req/s) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_rows = [r for path in a.real for r in rows(path)]
    all_rows.sort(key=lambda r: (float(r["rate"]), r["policy"]))
    for r in all_rows:
        out.append(
            f"| {float(r['rate']):g} | {r['policy']} | {float(r['ttft_p50_ms']):.0f} ms | {float(r['ttft_p90_ms']):.0f} ms | "
            f"{float(r['ttft_p99_ms']):.0f} ms | {float(r['itl_p50_ms']):.1f} ms | {float(r['itl_p99_ms']):.1f} ms | "
            f"{float(r['e2e_p50_ms']):.0f} ms | {float(r['out_tok_s']):.0f} | {float(r['hit_rate']) * 100:.0f}% | "
            f"{float(r['goodput']):.1f} | {r['failed']} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
