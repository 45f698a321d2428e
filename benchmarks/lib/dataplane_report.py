"""Tables of ``benchmarks/dataplane.py``: one set of rows, rendered as rich tables for the
console and as the markdown block for BENCHMARKS.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

PHASE2 = "not measured in this run"


@dataclass(frozen=True)
class Section:
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    notes: Sequence[str] = ()


def _n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}".replace(",", " ")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _ms(d: dict[str, Any] | None, key: str) -> str:
    v = (d or {}).get(key)
    return "-" if v is None else f"{v:.2f}"


def _cpu(d: dict[str, float], keys: Sequence[str]) -> str:
    return " + ".join(f"{d.get(k, 0.0):.1f}" for k in keys) + f" = {sum(d.get(k, 0.0) for k in keys):.1f}"


def section_a(a: dict[str, Any], args: dict[str, Any]) -> Section:
    b1, bk, h1, hk = a["bare_single"], a["bare_multi"], a["headrace_single"], a.get("headrace_multi")
    bare_keys = ("producer", "consumer", "reader", "redis")
    hr_keys = ("load_generator", "worker", "redis")
    rows = [
        ["1", _n(b1["samples_per_s"]), _n(h1["samples_per_s"]), _pct(a["ratio_single"]), ">= 60 %",
         _cpu(b1["cpu_us_per_sample"], bare_keys), _cpu(h1["cpu_us_per_sample"], hr_keys),
         f"{b1['load_average']} / {h1['load_average']}"],
        [str(bk["samples_per_entry"]), _n(bk["samples_per_s"]), _n(hk["samples_per_s"]) if hk else PHASE2,
         _pct(a.get("ratio_multi")), ">= 50 %", _cpu(bk["cpu_us_per_sample"], bare_keys),
         _cpu(hk["cpu_us_per_sample"], hr_keys) if hk else "-",
         f"{bk['load_average']} / {hk['load_average']}" if hk else f"{bk['load_average']}"],
    ]
    ha = a.get("headrace_arrays")
    if ha:
        rows.append([f"{bk['samples_per_entry']}, array path", _n(bk["samples_per_s"]), _n(ha["samples_per_s"]),
                     _pct(a.get("ratio_arrays")), ">= 50 %", "(same)", _cpu(ha["cpu_us_per_sample"], hr_keys),
                     f"{bk['load_average']} / {ha['load_average']}"])
    return Section("(a) zero-cost model: headrace vs the bare Redis ceiling (same payloads, same run)",
                   ["samples per entry", "bare ceiling samples/s", "headrace samples/s", "headrace / ceiling",
                    "target", "bare CPU us/sample (producer + consumer + reader + redis)",
                    "headrace CPU us/sample (load gen + worker + redis)", "load avg (bare / headrace)"], rows,
                   [f"headrace: `affine` fake worker, max_batch {args['max_batch']}, SDK `AsyncClient.imap` with "
                    f"{args['in_flight']} samples in flight (single) / the bare ceiling's window (multi) in its "
                    f"own process, `chunk_size` = samples per entry; mean batch {h1.get('mean_batch') or 0:.0f} / "
                    f"{(hk or {}).get('mean_batch') or 0:.0f} (largest model call of an entry's samples). "
                    f"Array path: `AsyncClient.imap_arrays` with blocks of {args.get('array_block', 0)} samples "
                    "(one array in, one ArrayResults out per block), same entries and window."])


def _tokenizer_rows(tok: dict[str, Any], smaller: float) -> list[list[str]]:
    """The tokenizer's limit (the method workers call) and, for comparison, the others."""
    method = tok.get("limit_method", "encode_batch")
    rows = [[f"limit: tokenizer {method} (what workers call), {int(tok['threads'])} threads",
             _n(tok.get("limit_sps", tok["encode_batch_sps"])), _pct(tok.get("limit_sps", tok["encode_batch_sps"]) / smaller),
             "-", "-", f"{tok.get('limit_cpu_us', tok['encode_batch_cpu_us']):.1f} CPU us/sample",
             str(tok["load_average"])]]
    if method != "encode_batch":
        rows.append(["(info) tokenizer encode_batch (with offsets)", _n(tok["encode_batch_sps"]),
                     _pct(tok["encode_batch_sps"] / smaller), "-", "-",
                     f"{tok['encode_batch_cpu_us']:.1f} CPU us/sample", ""])
    rows.append(["(info) tokenizer encode, one text at a time", _n(tok["encode_one_sps"]),
                 _pct(tok["encode_one_sps"] / smaller), "-", "-", f"{tok['encode_one_cpu_us']:.1f} CPU us/sample", ""])
    return rows


def section_b(b: dict[str, Any], args: dict[str, Any]) -> Section:
    lim, hr = b["limits"], b["headrace"]
    smaller = b["smaller_limit_sps"]
    cm, cu, tok = lim["curve_at_max_batch"], lim["curve_at_mean_batch"], lim["tokenizer"]
    rows = [
        [f"limit: curve at batch {int(cm['batch'])} (nominal {_n(cm['nominal_sps'])})", _n(cm["measured_sps"]),
         _pct(cm["measured_sps"] / smaller), "-", "-", "-", str(cm["load_average"])],
        [f"limit: curve at batch {int(cu['batch'])} (headrace's mean batch)", _n(cu["measured_sps"]),
         _pct(cu["measured_sps"] / smaller), "-", "-", "-", ""],
        *_tokenizer_rows(tok, smaller),
        [f"headrace standalone worker (SDK chunk_size {hr.get('chunk', 1)})", _n(hr["samples_per_s"]), _pct(b["ratio_to_limit"]),
         "-" if b["ratio_to_celery"] is None else f"{b['ratio_to_celery']:.1f}x", _n(hr.get("mean_batch")),
         _cpu(hr["cpu_us_per_sample"], ("load_generator", "worker", "redis")) + " CPU us/sample",
         str(hr["load_average"])],
    ]
    if "headrace_arrays" in b:
        ha = b["headrace_arrays"]
        rows.append([f"headrace, SDK array path (imap_arrays, blocks of {ha.get('block', '?')} texts, entries of "
                     f"{ha.get('chunk', 1)})", _n(ha["samples_per_s"]), _pct(b["ratio_arrays_to_limit"]),
                     "-" if not b.get("ratio_arrays_to_celery") else f"{b['ratio_arrays_to_celery']:.1f}x",
                     "-", _cpu(ha["cpu_us_per_sample"], ("load_generator", "worker", "redis")) + " CPU us/sample",
                     str(ha["load_average"])])
    labels = {"celery": "Ray Serve async inference (Celery), one task per request",
              "http": "Ray Serve HTTP + @serve.batch"}
    for name, s in b["systems"].items():
        if "failed" in s:
            rows.append([labels.get(name, name), "failed: " + s["failed"][:80], "", "", "", "", ""])
            continue
        rows.append([f"{labels.get(name, name)} (c={s['concurrency']})", _n(s["samples_per_s"]),
                     _pct(s["samples_per_s"] / smaller), "-", "-", f"p50/p99 {s['p50_ms'] or 0:.0f}/"
                     f"{s['p99_ms'] or 0:.0f} ms", str(s["load_average"])])
    return Section(f"(b) SIMULATION: accelerator stand-in ({b['curve']['label']}), real MiniLM tokenisation",
                   ["system", "samples/s", "of the smaller limit", "vs Celery", "mean batch", "notes",
                    "load avg"], rows,
                   [f"smaller limit: {_n(smaller)} samples/s ({b['limited_by']}); targets: >= 80 % of it and "
                    ">= 10x the Celery path.",
                    "SIMULATION: the device is a sleep that follows the measured H100 batch -> latency curve "
                    "(which includes that host's tokenisation, so tokenising here counts it twice: conservative)."])


def section_c(c: dict[str, Any]) -> Section:
    q, floor = c["queue_split"], (c["floor"] or {}).get("round_trip_ms")
    qq = q.get("queue", {})
    verdict = "-"
    if floor and qq.get("p50") is not None and floor.get("p50") is not None:
        ok50 = qq["p50"] <= floor["p50"] + 0.5
        ok99 = qq["p99"] <= 1.5 * floor["p99"]
        verdict = f"p50 {'met' if ok50 else 'missed'}, p99 {'met' if ok99 else 'missed'}"
    e2e = c["e2e"]
    served = e2e.get("throughput_rps") or 0.0
    errors = ", ".join(f"{k} {v}" for k, v in (e2e.get("errors") or {}).items()) or "none"
    rows = [[f"{_n(c['rate_sps'])} ({c['rate_basis']})", f"{_n(served)} ({served / c['rate_sps']:.0%}); errors: {errors}",
             f"{_ms(qq, 'p50')} / {_ms(qq, 'p99')}",
             f"{_ms(floor, 'p50')} / {_ms(floor, 'p99')}", verdict,
             f"{_ms(q.get('wire_in'), 'p50')} / {_ms(q.get('deliver'), 'p50')}",
             f"{_ms(e2e['e2e'], 'p50')} / {_ms(e2e['e2e'], 'p99')}",
             f"{_ms(c['reference']['e2e'], 'p50')} / {_ms(c['reference']['e2e'], 'p99')}", str(c["load_average"])]]
    bases = c.get("bases_sps") or {}
    notes = [f"{q.get('joined', 0)} requests joined with the worker's probes."]
    if bases:
        notes.append("half of the least of: " + "; ".join(f"{k} {_n(v)}/s" for k, v in bases.items())
                     + " (single-request capacity: a closed loop of single-sample submits, the traffic offered here).")
    gen = e2e.get("extra") or {}
    if "late_p99_ms" in gen:
        notes.append(f"load generator: late p50 / p99 {gen['late_p50_ms']:.2f} / {gen['late_p99_ms']:.2f} ms against "
                     f"its schedule; its own garbage collections (heap frozen at the start): "
                     f"{gen.get('gc_collections', '?')} ({gen.get('gc_full', '?')} full), longest "
                     f"{gen.get('gc_max_ms', 0.0):.1f} ms, {gen.get('gc_total_ms', 0.0):.0f} ms in all.")
    if served < 0.95 * c["rate_sps"]:
        notes.append("OVERLOADED: fewer answers than arrivals; the queue overhead above is a growing backlog.")
    return Section("(c) SIMULATION: queue overhead at half load vs the floor (stand-in worker, Poisson arrivals)",
                   ["offered samples/s", "answered samples/s", "queue overhead p50 / p99 ms", "floor p50 / p99 ms",
                    "target p50 <= floor + 0.5 ms, p99 <= 1.5 x floor", "wire in / deliver p50 ms",
                    "headrace e2e p50 / p99 ms", "in-process reference p50 / p99 ms", "load avg"], rows, notes)


def sections(doc: dict[str, Any]) -> list[Section]:
    res, args = doc["results"], doc["args"]
    out = []
    if "a" in res:
        out.append(section_a(res["a"], args))
    if "b" in res:
        out.append(section_b(res["b"], args))
    if "c" in res:
        out.append(section_c(res["c"]))
    out.append(Section("Not measured in this run", ["what", "status"], [
        ["K-partition request streams on Redis Cluster", "measured by `python -m benchmarks.partitions` "
         "(headrace's per-shard Redis CPU per request, 1 vs K partitions, on a loopback 3-master cluster) and "
         "`benchmarks/cluster_cpu.py` (the bare data plane)"],
        ["GPU rows (torch CUDA fp16, ONNX Runtime CUDA/TensorRT)", "not measured (no device lent to this run)"]]))
    return out


def tables(doc: dict[str, Any]) -> list[Table]:
    out = []
    for s in sections(doc):
        t = Table(title=s.title, caption="\n".join(s.notes) or None)
        for h in s.header:
            t.add_column(h)
        for r in s.rows:
            t.add_row(*r)
        out.append(t)
    return out


def markdown(doc: dict[str, Any]) -> str:
    a = doc["args"]
    lines = [f"`{doc['started_at']}`, {doc['host'].get('cpus')} CPUs, {a['threads']} worker threads, "
             f"max_batch {a['max_batch']}, {a['duration_s']:g} s windows after {a['warmup_s']:g} s warm-up "
             f"(load average noted per figure)", ""]
    for s in sections(doc):
        lines += [f"**{s.title}**", "", "| " + " | ".join(s.header) + " |",
                  "|" + "|".join("---" for _ in s.header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in s.rows]
        lines += [""] + [f"* {n}" for n in s.notes] + ([""] if s.notes else [])
    return "\n".join(lines)
