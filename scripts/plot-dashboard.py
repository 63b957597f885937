#!/usr/bin/env python3
"""Drive load through a running kvmesh mesh, then plot the Grafana dashboard's panels.

Run by scripts/plot-dashboard.sh, which starts the mesh (API keys sk-plot-ops/-acme/-burst,
guardrails, audit) and a Prometheus scraping it. Phases of load (fractions of --duration-s):
light, mixed (guardrail hits, a rate-limited tenant, bad keys), overload (flow control holds and
sheds), one node paused with SIGSTOP (gossip heartbeats age, the mesh shrinks), recovery.

Then every panel's targets[].expr from the dashboard JSON, with `$node` -> `.*` and
`$__rate_interval` -> 30s, goes through Prometheus's /api/v1/query_range, and the panels are drawn
in the dashboard's order, titled as in the dashboard. A query without data is marked "no data"
and warned about; more than --max-empty-panels panels without data exits 1.
"""
import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

MODEL = "kvmesh-sim"
SYSTEM_PROMPTS = [
    "You are a support assistant for a cloud storage company. " + "Answer briefly and cite the relevant policy section. " * 30,
    "You are a code reviewer. Point out bugs, unclear names and missing tests in the diff the user sends. " * 25,
    "You are a travel planner. Propose an itinerary with times, transport and a budget in euros for each day. " * 25,
]
WORDS = ("cache block prefix engine token request latency mesh gossip route node model queue "
         "tenant limit stream answer prompt policy window budget night train museum").split()

# (name, fraction of the run, requests/s, max_tokens range, nodes used)
PHASES = [
    ("light", 0.18, 2.0, (16, 64), "all"),
    ("mixed", 0.25, 6.0, (16, 96), "all"),
    ("overload", 0.20, 30.0, (128, 320), "all"),
    ("node paused", 0.17, 5.0, (16, 96), "first two"),
    ("recovery", 0.20, 3.0, (16, 64), "all"),
]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_status = {}

    def add(self, status):
        with self.lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1


def send(url, key, body, stats, timeout=30):
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer " + key},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            while resp.read(65536):
                pass
            stats.add(str(resp.status))
    except urllib.error.HTTPError as e:
        e.read()
        stats.add(str(e.code))
    except Exception as e:  # timeouts, resets while a node is paused
        stats.add(type(e).__name__)


def chat_body(rng, max_tokens_range):
    user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
    r = rng.random()
    if r < 0.08:
        user += " Reply to jane.doe@example.com or call +1 415 555 0100."  # pii: redacted
    elif r < 0.12:
        user += " This is internal-only material."  # deny guardrail
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
            {"role": "user", "content": user},
        ],
        "max_tokens": rng.randint(*max_tokens_range),
        "stream": rng.random() < 0.8,
    }


def drive(urls, pause_pid, duration_s, stats):
    """Open-loop Poisson arrivals through the phases; returns [(name, start, end)] in unix time."""
    rng = random.Random(7)
    pool = ThreadPoolExecutor(max_workers=300)
    phases = []
    t0 = time.time()
    for name, frac, rate, mt, nodes in PHASES:
        start = time.time()
        end = start + frac * duration_s
        targets = urls if nodes == "all" else urls[:2]
        paused = nodes != "all" and pause_pid
        if paused:
            os.kill(pause_pid, signal.SIGSTOP)
        print(f"[{start - t0:6.1f}s] phase {name}: {rate} req/s to {len(targets)} nodes"
              + (f", node pid {pause_pid} stopped" if paused else ""), file=sys.stderr)
        side_next = start
        while True:
            now = time.time()
            if now >= end:
                break
            pool.submit(send, rng.choice(targets), "sk-plot-acme", chat_body(rng, mt), stats)
            # From the mixed phase on: a tenant over its 30/min limit (429s) and a bad key (401s).
            if name != "light" and now >= side_next:
                side_next = now + 1.0
                pool.submit(send, rng.choice(targets), "sk-plot-burst", chat_body(rng, (16, 32)), stats)
                if rng.random() < 0.3:
                    pool.submit(send, rng.choice(targets), "sk-wrong-key", chat_body(rng, (16, 32)), stats)
            time.sleep(min(rng.expovariate(rate), max(0.0, end - time.time())))
        if paused:
            os.kill(pause_pid, signal.SIGCONT)
        phases.append((name, start, time.time()))
    pool.shutdown(wait=True)
    return phases


def expand(expr):
    return (expr.replace("$__rate_interval", "30s").replace("${node}", ".*").replace("$node", ".*")
            .replace("${model_name}", ".*").replace("$model_name", ".*"))


def legend(fmt, labels, expr):
    if not fmt:
        return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else expr[:40]
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v).replace("{{ " + k + " }}", v)
    return out


def query_range(prom, expr, start, end, step):
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{qs}", timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


UNITS = {"reqps": "req/s", "s": "seconds", "ops": "per second", "Bps": "bytes/s",
         "percentunit": "fraction", "short": ""}


def plot(args, phases):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.load(open(args.dashboard))
    panels = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            panels.extend(p.get("panels", []))
        elif p.get("targets"):
            panels.append(p)
    panels.sort(key=lambda p: (p.get("gridPos", {}).get("y", 0), p.get("gridPos", {}).get("x", 0)))

    t0 = phases[0][1]
    step_s = float(args.step.rstrip("s"))
    start, end = t0 - 5, phases[-1][2] + 10
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(20, 3.6 * rows + 0.8), dpi=100, squeeze=False)
    empty_panels, empty_targets = [], []
    for ax, panel in zip(axes.flat, panels):
        title = panel.get("title", "?")
        ax.set_title(title, fontsize=11, fontweight="bold")
        has_data = False
        series_count = 0
        for tgt in panel["targets"]:
            expr = expand(tgt["expr"])
            result = query_range(args.prometheus, expr, start, end, args.step)
            finite = 0
            for s in result:
                xs, ys = [], []
                for ts, v in s["values"]:
                    if xs and float(ts) - t0 - xs[-1] > 1.5 * step_s:
                        xs.append(xs[-1] + step_s)  # missing samples (a stale or unscraped
                        ys.append(float("nan"))     # series): a gap, not a straight line
                    xs.append(float(ts) - t0)
                    ys.append(float(v))  # "NaN" -> nan: a gap
                finite += sum(1 for y in ys if y == y)
                if not xs:
                    continue
                series_count += 1
                label = legend(tgt.get("legendFormat"), s["metric"], expr)
                ax.plot(xs, ys, label=label if series_count <= args.max_legend else "_", linewidth=1.4)
            if finite == 0:
                empty_targets.append((title, tgt.get("legendFormat") or "", expr))
                print(f"warning: no data: [{title}] {expr}", file=sys.stderr)
            has_data |= finite > 0
        for name, ps, pe in phases:
            if name == "overload":
                ax.axvspan(ps - t0, pe - t0, color="tab:red", alpha=0.08, lw=0)
            elif name == "node paused":
                ax.axvspan(ps - t0, pe - t0, color="tab:gray", alpha=0.18, lw=0)
        ax.set_xlim(start - t0, end - t0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if UNITS.get(unit, unit):
            ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        if has_data:
            handles, labels = ax.get_legend_handles_labels()
            extra = series_count - min(series_count, args.max_legend)
            if extra > 0:
                labels[-1] += f"  (+{extra} more)"
            if handles:
                ax.legend(handles, labels, fontsize=7, loc="upper left", framealpha=0.7)
        else:
            empty_panels.append(title)
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                    fontsize=18, color="tab:red", alpha=0.8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since load started", fontsize=8)
    # Phases along the top.
    phase_text = "   ".join(f"{n}: {ps - t0:.0f}-{pe - t0:.0f}s" for n, ps, pe in phases)
    fig.suptitle(f"{dash.get('title', 'kvmesh')} dashboard over a {phases[-1][2] - t0:.0f} s run "
                 f"of 3 nodes with embedded simulators (Prometheus, 1 s scrapes)\n"
                 f"phases  {phase_text}   (red: overload, grey: one node SIGSTOPped)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}: {len(panels)} panels, {len(panels) - len(empty_panels)} with data",
          file=sys.stderr)
    return empty_panels, empty_targets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", required=True, help="nodes' base URLs, comma-separated")
    ap.add_argument("--pause-pid", type=int, default=0, help="a node's pid, SIGSTOPped in one phase")
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--duration-s", type=float, default=150)
    ap.add_argument("--step", default="2s", help="query_range step, in seconds (`2s`)")
    ap.add_argument("--dashboard", default="deploy/grafana/kvmesh-dashboard.json")
    ap.add_argument("--out", default="docs/dashboard.png")
    ap.add_argument("--max-legend", type=int, default=6)
    ap.add_argument("--max-empty-panels", type=int, default=2)
    args = ap.parse_args()

    stats = Stats()
    phases = drive(args.urls.split(","), args.pause_pid, args.duration_s, stats)
    print("responses: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.by_status.items())),
          file=sys.stderr)
    time.sleep(8)  # the last scrapes and rates
    empty_panels, empty_targets = plot(args, phases)
    if empty_targets:
        print(f"{len(empty_targets)} queries returned no data:", file=sys.stderr)
        for title, leg, expr in empty_targets:
            print(f"  [{title}] {leg}: {expr}", file=sys.stderr)
    if len(empty_panels) > args.max_empty_panels:
        print(f"error: {len(empty_panels)} panels without data (at most {args.max_empty_panels}): "
              + "; ".join(empty_panels), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
