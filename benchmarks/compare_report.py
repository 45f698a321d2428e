"""The report of :mod:`benchmarks.compare`: the rich table per model artifact, the PNG plots
(latency against offered load, saturation throughput), and redrawing both from a run's JSON
(``--replot``) without measuring again."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from headrace.cluster.bench.plot import plot_latency_vs_load, plot_throughput_bars
from headrace.cluster.bench.stats import LoadPoint, latency_pair, open_level_cells

LABELS = {"raw": "raw limit (in-process)", "standalone": "headrace standalone", "ray1": "headrace on Ray, 1 replica",
          "ray2": "headrace on Ray, 2 replicas", "celery": "Ray async inference (Celery)",
          "http": "Ray Serve HTTP @serve.batch"}


def parse_loads(raw: str) -> list[float]:
    """The open-loop levels of ``--loads`` ("0.5,0.8") as fractions of the raw limit."""
    return [float(x) for x in raw.split(",") if x.strip()]


def render(res: dict[str, Any], args: argparse.Namespace) -> Table:
    loads = [f"{f:.0%}" for f in parse_loads(args.loads)]
    t = Table(title=f"{res['model']} ({res['precision']}): raw limit {res['limit_rps']:.1f}/s at batch {args.batch} "
                    f"(after the run: {res['raw_after']['rps']:.1f}/s), {args.threads} model threads per system")
    t.add_column("system")
    t.add_column(f"throughput/s (c={args.concurrency or 3 * args.batch})", justify="right")
    t.add_column("of limit", justify="right")
    t.add_column("CPU us/req (system + load gen)", justify="right")
    t.add_column("closed p50/p99 ms", justify="right")
    for lv in loads:
        t.add_column(f"p50/p99 ms @{lv}", justify="right")
    t.add_column("errors", justify="right")
    for name, s in res["systems"].items():
        if "failed" in s:
            t.add_row(LABELS[name], "failed", "", "", s["failed"][:60], *([""] * len(loads)), "")
            continue
        c = s["closed"]
        thr = res["limit_rps"] if c is None else c["throughput_rps"]
        cpu = None if c is None else c["extra"].get("cpu_us_per_request")
        cells = [f"{thr:.1f}", f"{100 * thr / res['limit_rps']:.1f}%",
                 f"{res['raw'][str(args.batch)]['cpu_us_per_request']:.0f}" if c is None
                 else (f"{cpu['system']:.0f} + {cpu['load_generator']:.0f}" if cpu else "-"),
                 "-" if c is None else latency_pair(c, "/")]
        open_cells, open_errs = open_level_cells(s, loads, "/")
        errs = (0 if c is None else sum(c["errors"].values())) + open_errs
        t.add_row(LABELS[name], *cells, *open_cells, str(errs))
    return t


def plots(res: dict[str, Any], kind: str, args: argparse.Namespace) -> list[str]:
    series: dict[str, list[LoadPoint]] = {}
    bars: dict[str, float] = {}
    for name, s in res["systems"].items():
        if "failed" in s:
            continue
        pts = [_from_json(o) for o in s["open"].values() if o and not o.get("overloaded")]
        if s["closed"] is not None:
            pts.append(_from_json(s["closed"]))
            bars[LABELS[name]] = s["closed"]["throughput_rps"]
        series[LABELS[name]] = pts
    bars = {LABELS["raw"]: res["limit_rps"], **bars}
    d = Path(args.plot_dir)
    a = plot_latency_vs_load(series, d / f"bench_compare_latency_{kind}.png", limit_rps=res["limit_rps"],
                             title=f"{res['model']}: end-to-end latency vs offered load")
    b = plot_throughput_bars(bars, d / f"bench_compare_throughput_{kind}.png", limit_rps=res["limit_rps"],
                             title=f"{res['model']}: saturation throughput (batch {args.batch})")
    return [str(a), str(b)]


def _from_json(d: dict[str, Any]) -> LoadPoint:
    from headrace.cluster.bench.stats import LatencySummary

    return LoadPoint(label=d["label"], mode=d["mode"], window_s=d["window_s"], sent=d["sent"],
                     completed=d["completed"], ok=d["ok"], errors=d["errors"], throughput_rps=d["throughput_rps"],
                     achieved_rps=d["achieved_rps"], e2e=LatencySummary(**d["e2e"]),
                     queue=LatencySummary(**d["queue"]), infer=LatencySummary(**d["infer"]),
                     delivery=LatencySummary(**d["delivery"]), offered_rps=d.get("offered_rps"),
                     concurrency=d.get("concurrency"))


def replot(path: str, plot_dir: str) -> None:
    doc = json.loads(Path(path).read_text())
    args = argparse.Namespace(**{**doc["args"], "plot_dir": plot_dir})
    console = Console()
    for kind, res in doc["results"].items():
        console.print(render(res, args))
        console.print(", ".join(plots(res, kind, args)))
