"""Markdown tables for BENCHMARKS.md from the JSON the benchmark scripts write, so the
figures in the document are copied by a program, not by hand.

    .venv/bin/python -m benchmarks.report_md runs/e2e_vs_raw.json runs/compare.json runs/redis_ops.json runs/scaling.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from headrace.cluster.bench.stats import latency_pair, open_level_cells


def ms(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def e2e_vs_raw(doc: dict[str, Any]) -> str:
    a = doc["args"]
    lines = [f"`{doc['started_at']}`, {doc['host']['cpus']} CPUs, batch {a['batch']}, "
             f"{a.get('instances', 1)} x {a['threads']} ORT threads (instances x threads per call), "
             f"ORT spin-wait {a.get('ort_spin', 'on')}, {a['rounds']} rounds x {a['duration_s']:g} s, "
             f"load {a['load']:.0%} of the raw limit", "",
             "| model | raw limit /s | end-to-end /s | e2e / raw (per round) | queue overhead p50 / p99 ms "
             "| floor: bare Streams round trip p50 / p99 ms "
             "| wire in p50 / p99 ms | deliver p50 / p99 ms | e2e p50 / p99 ms at load | in-process p50 / p99 ms "
             "| CPU us/req raw vs worker + redis + load gen | CPU-normalized e2e/raw (without load gen) "
             "| model ms/req raw vs worker (model busy) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        q = r["queue_split"]
        cu = r["cpu_us_per_request"]
        errs = sum(sum(c["errors"].values()) for c in r["closed"]) + sum(r["open"]["errors"].values())
        rounds = ", ".join(f"{100 * x['ratio']:.1f}" for x in r["rounds"])
        lines.append(
            f"| {r['model']} ({r['precision']}) | {r['raw_rps']:.1f} | {r['e2e_rps']:.1f} | "
            f"**{100 * r['ratio']:.1f}%** ({rounds}) | "
            f"**{ms(q['queue']['p50'], 2)} / {ms(q['queue']['p99'], 2)}** | {floor_cell(r.get('floor'))} | "
            f"{ms(q['wire_in']['p50'], 2)} / {ms(q['wire_in']['p99'], 2)} | "
            f"{ms(q['deliver']['p50'], 2)} / {ms(q['deliver']['p99'], 2)} | "
            f"{ms(r['open']['e2e']['p50'])} / {ms(r['open']['e2e']['p99'])} | "
            f"{ms(r['reference']['e2e']['p50'])} / {ms(r['reference']['e2e']['p99'])} | "
            f"{cu['raw']:.0f} vs {cu['worker']:.0f} + {cu['redis']:.0f} + {cu['client']:.0f} | "
            f"{100 * cu['raw'] / (cu['worker'] + cu['redis'] + cu['client']):.0f}% "
            f"({100 * cu['raw'] / (cu['worker'] + cu['redis']):.0f}%) | "
            f"{model_line(r)} | {errs} |")
    fake = doc.get("fake")
    if fake:
        q, o = fake["queue_split"], fake["open"]
        lines += ["", f"Zero-cost model (the `affine` fake) at {fake['rate_rps']:.0f} requests/s, same probes: "
                      f"queue overhead p50 / p99 **{ms(q['queue']['p50'], 2)} / {ms(q['queue']['p99'], 2)} ms** "
                      f"(wire in {ms(q['wire_in']['p50'], 2)} / {ms(q['wire_in']['p99'], 2)}, deliver "
                      f"{ms(q['deliver']['p50'], 2)} / {ms(q['deliver']['p99'], 2)}); end-to-end p50 / p99 "
                      f"{ms(o['e2e']['p50'], 2)} / {ms(o['e2e']['p99'], 2)} ms (includes the {a['max_wait_ms']:g} ms "
                      f"batching wait), {sum(o['errors'].values())} errors; floor (bare Streams round trip at the "
                      f"same rate) p50 / p99 {floor_cell(fake.get('floor'))} ms"]
    return "\n".join(lines)


def floor_cell(floor: dict[str, Any] | None) -> str:
    if not floor:
        return "-"
    rt = floor["round_trip_ms"]
    return f"{ms(rt['p50'], 2)} / {ms(rt['p99'], 2)}"


def model_line(r: dict[str, Any]) -> str:
    raw = [x.get("model_ms_per_request") for x in r["raws"]]
    e2e = [c["extra"].get("model_ms_per_request") for c in r["closed"]]
    busy = [c["extra"].get("model_busy") for c in r["closed"]]
    if None in raw or None in e2e or None in busy:
        return "-"
    return (f"{sum(raw) / len(raw):.2f} vs {sum(e2e) / len(e2e):.2f} "
            f"({100 * sum(busy) / len(busy):.0f}%)")


LABELS = {"raw": "raw limit (in-process)", "standalone": "headrace standalone worker",
          "ray1": "headrace on Ray Serve, 1 replica", "ray2": "headrace on Ray Serve, 2 replicas",
          "celery": "Ray Serve async inference (Celery)", "http": "Ray Serve HTTP + @serve.batch"}


def compare(doc: dict[str, Any]) -> str:
    a = doc["args"]
    loads = [f"{float(x):.0%}" for x in a["loads"].split(",")]
    conc = next((s["closed"]["concurrency"] for res in doc["results"].values() for s in res["systems"].values()
                 if s.get("closed")), a["concurrency"])
    out = [f"`{doc['started_at']}`, {doc['host']['cpus']} CPUs, batch {a['batch']}, {a['threads']} model threads per "
           f"system, ORT spin-wait {a.get('ort_spin', 'on')}, closed loop c={conc}, "
           f"{a['duration_s']:g} s windows"]
    for res in doc["results"].values():
        raw = res["raw"]
        out += ["", f"**{res['model']} ({res['precision']})**: raw "
                    + ", ".join(f"batch {b}: {v['rps']:.1f}/s" for b, v in raw.items())
                    + f"; limit = batch {a['batch']} = {res['limit_rps']:.1f}/s "
                      f"(re-measured after the run: {res['raw_after']['rps']:.1f}/s)", "",
                "| system | throughput /s | of limit | CPU us/req (system + load gen) | CPU-normalized of limit | "
                "closed-loop p50 / p99 ms | "
                + " | ".join(f"p50 / p99 ms at {lv} ({r:.0f}/s)" for lv, r in zip(loads, res["rates"], strict=True))
                + " | errors |",
                "|---|---:|---:|---:|---:|---:|" + "---:|" * len(loads) + "---:|"]
        for name, s in res["systems"].items():
            if "failed" in s:
                out.append(f"| {LABELS[name]} | failed: {s['failed'][:80]} |" + " |" * (len(loads) + 5))
                continue
            c = s["closed"]
            thr = res["limit_rps"] if c is None else c["throughput_rps"]
            raw_cpu = (raw[str(a["batch"])].get("cpu_us_per_request", 0.0)
                       + res["raw_after"].get("cpu_us_per_request", 0.0)) / 2
            cpu = None if c is None else c["extra"].get("cpu_us_per_request")
            if c is None:
                cpu_cells = [f"{raw_cpu:.0f} (model only)", "100%"]
            elif cpu:
                cpu_cells = [f"{cpu['system']:.0f} + {cpu['load_generator']:.0f}",
                             f"{100 * raw_cpu / cpu['total']:.0f}%"]
            else:
                cpu_cells = ["-", "-"]
            cells = [f"{thr:.1f}", f"{100 * thr / res['limit_rps']:.0f}%", *cpu_cells,
                     "-" if c is None else latency_pair(c)]
            open_cells, open_errs = open_level_cells(s, loads)
            errs = (0 if c is None else sum(c["errors"].values())) + open_errs
            out.append(f"| {LABELS[name]} | " + " | ".join([*cells, *open_cells]) + f" | {errs} |")
    return "\n".join(out)


def redis_ops(doc: dict[str, Any]) -> str:
    a = doc["args"]
    out = [f"`{doc['started_at']}`, {doc['host']['cpus']} CPUs, {doc['redis_version'].split(' ')[2]}, "
           f"{a['workers']} fake-model workers, {a['clients']} load generators x c={a['concurrency']}, "
           f"max_batch {a['max_batch']}, mean batch {', '.join(f'{m:.1f}' for m in doc['mean_batch'] if m)}", "",
           f"- answered: **{doc['answered_rps']:.0f} requests/s** (CPU-bound by the Python processes), "
           f"{doc['commands_per_s']:.0f} Redis commands/s (script-internal included)",
           f"- Redis CPU: {100 * doc['redis_cpu_fraction']:.0f}% of one core = "
           f"**{doc['redis_cpu_us_per_request']:.1f} us per request**",
           *([f"- around it: the workers' Python {doc['python_cpu_us_per_request']['workers']:.0f} us and the "
              f"load generators' asyncio SDK {doc['python_cpu_us_per_request']['clients']:.0f} us of CPU per request"]
             if "python_cpu_us_per_request" in doc else []),
           f"- ceiling of one Redis core with this pattern (estimate, 1e6 / us per request): "
           f"**~{doc['ceiling_rps_estimate']:.0f} requests/s**", "",
           "| command | calls per request | us per call |", "|---|---:|---:|"]
    for name, c in sorted(doc["commands"].items(), key=lambda kv: -kv[1]["usec_per_request"]):
        if c["calls_per_request"] >= 0.001:
            label = name.replace("|", " ")  # "xinfo|groups" would split the markdown cell
            out.append(f"| {label} | {c['calls_per_request']:.3f} | {c['usec_per_call']:.1f} |")
    return "\n".join(out)


def scaling(doc: dict[str, Any]) -> str:
    a = doc["args"]
    out = [f"`{doc['started_at']}`, {doc['host']['cpus']} CPUs, fake model: {a['delay_ms']:g} ms per batch of "
           f"{a['max_batch']} (sleeps, no CPU)"]
    for part, what in (("processes", "worker processes"), ("ray", f"Ray replicas ({a['nodes']} simulated nodes)")):
        if part not in doc:
            continue
        out += ["", f"| {what} | throughput /s | ideal /s | efficiency | p50 / p99 ms | replicas per node |",
                "|---:|---:|---:|---:|---:|---|"]
        for r in doc[part]:
            out.append(f"| {r['n']} | {r['throughput_rps']:.0f} | {r['ideal_rps']:.0f} | {100 * r['efficiency']:.0f}% "
                       f"| {ms(r['p50_ms'])} / {ms(r['p99_ms'])} | "
                       f"{'/'.join(map(str, r.get('replicas_per_node', []))) or '-'} |")
    return "\n".join(out)


def main(paths: list[str]) -> None:
    for p in paths:
        doc = json.loads(Path(p).read_text())
        kind = doc.get("benchmark")
        render = {"e2e_vs_raw": e2e_vs_raw, "compare": compare, "redis_ops": redis_ops, "scaling": scaling}.get(kind)
        if render is None:
            print(f"<!-- {p}: unknown benchmark {kind!r} -->")
            continue
        print(f"<!-- from {p} -->")
        print(render(doc))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
