"""What batching from a queue is worth at accelerator speed (issue 14): three ratios, one run.

* **(a) zero-cost model**: samples/s through headrace (the ``affine`` fake behind a
  standalone worker, the SDK's ``AsyncClient.imap`` in a process of its own) against the
  bare Redis ceiling at the same samples per entry (:mod:`benchmarks.lib.ceiling`:
  pipelined ``XADD`` + ``XREADGROUP`` + ``XACK`` with headrace's payloads, producer /
  consumer / reader processes), with single-sample entries and with ``--samples-per-entry``
  samples per entry (``imap`` and the array path ``imap_arrays``).
* **(b) accelerator stand-in** (a SIMULATION, :mod:`benchmarks.lib.standin`): samples/s
  through headrace against the smaller of two limits measured in this run: the curve's own
  limit (the stand-in's device back to back at ``--max-batch``) and the tokenizer's
  (``encode_batch`` on the real texts with ``--threads`` threads). The same stand-in behind
  Ray Serve's Celery async path and ``@serve.batch`` HTTP (``--systems``).
* **(c) queue overhead at 50 % load**: single-sample Poisson arrivals (one ``submit`` per
  arrival, as latency-bound callers send them) through a probed stand-in worker, at half of
  the least of the smaller limit, headrace's (b) throughput and the *single-request
  capacity*: what the same traffic carries at most, measured in this run by a closed loop of
  ``--c-concurrency`` callers each sending one single-sample request at a time. (b) is
  measured with multi-sample entries through ``imap``, a cheaper path per sample; half of it
  can be more than single requests carry at all, and an overloaded queue measures its own
  backlog, not its overhead. The queue's part of each latency (send -> worker read + commit
  start -> client decoded) is set against the floor, a bare two-hop Redis Streams round trip
  at the same rate measured meanwhile (its processes share the cores with the in-process
  reference's run).

Prints tables and a markdown block for BENCHMARKS.md, writes JSON. Asserts nothing about
speed. Every figure is noted with the machine's load average at the time.

    .venv/bin/python -m benchmarks.dataplane [--threads 2] [--max-batch 256] [--systems celery,http] \\
        [--json runs/dataplane.json] [--markdown runs/dataplane.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.lib import dataplane_report as report
from benchmarks.lib.ceiling import CeilingConfig, bare_ceiling
from benchmarks.lib.floor import stream_round_trip_floor
from benchmarks.lib.limits import tokenizer_limit
from benchmarks.lib.output import write_json
from benchmarks.lib.probe import load_probes, queue_split
from benchmarks.lib.standin import DEFAULT_CURVE_FILE, LatencyCurve, curve_limit, make_standin, standin_factory
from benchmarks.lib.systems import WorkerProcesses, process_cpu_s, thread_env
from headrace.client.aio import AsyncClient
from headrace.cluster.bench.load import RunLimits, closed_loop, open_loop
from headrace.cluster.bench.run import host_info
from headrace.cluster.bench.stats import summarize
from headrace.cluster.bench.targets import HeadraceTarget, InProcessTarget, Payloads, text_payloads
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parents[1]
ALL_SYSTEMS = ("celery", "http")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,b,c", help="comma list of a, b, c")
    ap.add_argument("--threads", type=int, default=2, help="worker threads (math libraries, tokenizer pool)")
    ap.add_argument("--max-batch", type=int, default=256, help="worker max_batch (and @serve.batch's)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--in-flight", type=int, default=1024, help="samples outstanding (SDK map window, bare producer)")
    ap.add_argument("--samples-per-entry", type=int, default=64,
                    help="(a): samples per multi-sample entry, bare ceiling and headrace")
    ap.add_argument("--array-block", type=int, default=1024,
                    help="(a), (b): samples per block of the SDK's array path (imap_arrays), sent in entries of "
                         "--samples-per-entry (a) / --b-chunk (b)")
    ap.add_argument("--b-chunk", type=int, default=32, help="(b)/(c): the SDK's chunk_size (1: single-sample)")
    ap.add_argument("--standin", default="cuda fp16", help="curve run of the stand-in")
    ap.add_argument("--curve", default=str(DEFAULT_CURVE_FILE), help="gpu_torch.py report holding the curve")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comparison systems for (b); '' for none")
    ap.add_argument("--celery-concurrency", type=int, default=64, help="outstanding Celery tasks (closed loop)")
    ap.add_argument("--http-concurrency", type=int, default=256, help="outstanding HTTP requests (closed loop)")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--duration-s", type=float, default=8.0)
    ap.add_argument("--limit-s", type=float, default=3.0, help="seconds per limit measurement")
    ap.add_argument("--load", type=float, default=0.5, help="(c): fraction of the least capacity offered")
    ap.add_argument("--c-concurrency", type=int, default=512,
                    help="(c): callers of the closed loop that measures the single-request capacity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/dataplane.json")
    ap.add_argument("--markdown", default="", help="also write the markdown block here")
    return ap.parse_args(argv)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def bench_workers(redis: EmbeddedRedis, args: argparse.Namespace, ns: str, *, standin: bool = True,
                  probe_file: str = "") -> WorkerProcesses:
    """The bench worker serving the stand-in (``minilm-standin``) or the ``affine`` fake at
    ``--max-batch`` / ``--max-wait-ms``; ``probe_file``: note its probes there."""
    model, fake = ("minilm-standin", "") if standin else ("affine", "affine")
    extra = ["--standin", args.standin, "--curve", args.curve] if standin else []
    extra += ["--probe-out", probe_file] if probe_file else []
    return WorkerProcesses(redis.url, ns, model, fake=fake, module="benchmarks.lib.bench_worker", extra_args=extra,
                           threads=args.threads, settings={"max_batch": args.max_batch,
                                                           "max_wait_ms": args.max_wait_ms})


def headrace_saturation(redis: EmbeddedRedis, args: argparse.Namespace, *, standin: bool,
                        chunk: int = 1, in_flight: int = 0, block: int = 0) -> dict[str, Any]:
    """One worker (stand-in or ``affine`` fake) saturated by ``benchmarks.lib.saturate``
    with multi-sample entries of ``chunk`` samples (1: single-sample entries); ``block`` > 0
    drives the SDK's array path with blocks of that many samples."""
    ns = f"dp-{uuid.uuid4().hex[:6]}"
    model, kind = ("minilm-standin", "text") if standin else ("affine", "affine")
    with bench_workers(redis, args, ns, standin=standin) as workers:
        w0, r0 = sum(process_cpu_s(p) for p in workers.pids), process_cpu_s(redis.proc.pid if redis.proc else 0)
        out = subprocess.run([sys.executable, "-m", "benchmarks.lib.saturate", redis.url, ns, model, kind,
                              str(in_flight or args.in_flight), str(args.warmup_s), str(args.duration_s),
                              str(chunk), *(["--arrays", str(block)] if block else [])],
                             capture_output=True, text=True, check=True, timeout=args.warmup_s + args.duration_s + 180)
        w1, r1 = sum(process_cpu_s(p) for p in workers.pids), process_cpu_s(redis.proc.pid if redis.proc else 0)
    res = json.loads(out.stdout)
    n = max(1, res["answers_total"])
    res["cpu_us_per_sample"] = {"worker": (w1 - w0) * 1e6 / n, "redis": (r1 - r0) * 1e6 / n,
                                "load_generator": res["load_generator_cpu_us_per_sample"]}
    res["load_average"] = loadavg()
    return res


def part_a(redis: EmbeddedRedis, args: argparse.Namespace) -> dict[str, Any]:
    k = args.samples_per_entry
    bare1 = bare_ceiling(redis.url, CeilingConfig(1, args.in_flight, warmup_s=args.warmup_s,
                                                  duration_s=args.duration_s))
    bare1["load_average"] = loadavg()
    window = max(args.in_flight, 64 * k)
    bare_k = bare_ceiling(redis.url, CeilingConfig(k, window, warmup_s=args.warmup_s,
                                                   duration_s=args.duration_s))
    bare_k["load_average"] = loadavg()
    single = headrace_saturation(redis, args, standin=False)
    multi = headrace_saturation(redis, args, standin=False, chunk=k, in_flight=window)
    arrays = headrace_saturation(redis, args, standin=False, chunk=k, in_flight=window, block=args.array_block)
    return {"bare_single": bare1, "bare_multi": bare_k, "headrace_single": single,
            "ratio_single": single["samples_per_s"] / bare1["samples_per_s"],
            "headrace_multi": multi, "ratio_multi": multi["samples_per_s"] / bare_k["samples_per_s"],
            "headrace_arrays": arrays, "ratio_arrays": arrays["samples_per_s"] / bare_k["samples_per_s"]}


def ray_up(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    port = free_port()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # address="local": a private Ray cluster, never one another process started here.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {**thread_env(args.threads), "PYTHONPATH": path}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


async def celery_run(redis: EmbeddedRedis, args: argparse.Namespace, payloads: Payloads) -> dict[str, Any]:
    from ray import serve

    from benchmarks.lib.baselines import CeleryTarget, build_celery_app, purge_celery_queue

    queue = f"dp-{uuid.uuid4().hex[:6]}"
    app = build_celery_app(redis.url, queue, make_servable=standin_factory(args.standin, args.curve, args.max_batch))
    await asyncio.to_thread(serve.run, app, name=queue, route_prefix=None)
    target = CeleryTarget(redis.url, queue, payloads, threads=args.celery_concurrency, name="celery")
    try:
        first = await target.call(0, 300.0)
        if first.status != "ok":
            raise RuntimeError(f"the Celery consumer did not answer a first task: {first}")
        return await closed_run(target, args.celery_concurrency, args)
    finally:
        target.close()
        await asyncio.to_thread(serve.delete, queue)
        await asyncio.to_thread(purge_celery_queue, redis.url, queue)


async def http_run(port: int, args: argparse.Namespace, payloads: Payloads) -> dict[str, Any]:
    from ray import serve

    from benchmarks.lib.baselines import HttpTarget, build_http_batch_app

    name = f"dp-http-{uuid.uuid4().hex[:6]}"
    app = build_http_batch_app(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                               max_ongoing_requests=2 * args.http_concurrency,
                               make_servable=standin_factory(args.standin, args.curve, args.max_batch))
    await asyncio.to_thread(serve.run, app, name=name, route_prefix=f"/{name}")
    try:
        async with HttpTarget(f"http://127.0.0.1:{port}/{name}", payloads, max_conns=2 * args.http_concurrency,
                              name="http") as target:
            first = await target.call(0, 120.0)
            if first.status != "ok":
                raise RuntimeError(f"the HTTP deployment did not answer: {first}")
            return await closed_run(target, args.http_concurrency, args)
    finally:
        await asyncio.to_thread(serve.delete, name)


def run_limits(args: argparse.Namespace) -> RunLimits:
    """The bounds of every measured run: the windows of the command line, no request cap,
    60 s for the answers still out."""
    return RunLimits(args.duration_s, args.warmup_s, 10_000_000, 60.0)


async def closed_run(target: Any, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    rr = await closed_loop(target, concurrency, run_limits(args))
    p = summarize(rr.samples, label=target.name, mode="closed", start_s=rr.start_s, end_s=rr.end_s,
                  concurrency=concurrency)
    return {"samples_per_s": p.throughput_rps, "errors": p.errors, "concurrency": concurrency,
            "p50_ms": p.e2e.p50, "p99_ms": p.e2e.p99, "load_average": loadavg()}


def comparison_systems(redis: EmbeddedRedis, args: argparse.Namespace, payloads: Payloads) -> dict[str, Any]:
    systems = [s for s in args.systems.split(",") if s.strip()]
    if not systems:
        return {}
    out: dict[str, Any] = {}
    port = ray_up(args)
    try:
        for name in systems:
            try:
                out[name] = asyncio.run(celery_run(redis, args, payloads) if name == "celery"
                                        else http_run(port, args, payloads))
            except Exception as e:  # noqa: BLE001 - one broken system must not lose the others' figures
                out[name] = {"failed": f"{type(e).__name__}: {e}"}
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return out


def part_b(redis: EmbeddedRedis, args: argparse.Namespace, payloads: Payloads) -> dict[str, Any]:
    hr = headrace_saturation(redis, args, standin=True, chunk=args.b_chunk)
    arrays = headrace_saturation(redis, args, standin=True, chunk=args.b_chunk, block=args.array_block)
    curve = LatencyCurve.load(args.curve, args.standin)
    at_max = curve_limit(curve, args.max_batch, args.limit_s)
    used = max(1, round(hr["mean_batch"] or 1))
    at_used = curve_limit(curve, used, args.limit_s)
    tok = tokenizer_limit(args.threads, args.max_batch, args.limit_s, seed=args.seed)
    limits = {"curve_at_max_batch": {**at_max, "load_average": loadavg()}, "curve_at_mean_batch": at_used,
              "tokenizer": {**tok, "load_average": loadavg()}}
    smaller = min(at_max["measured_sps"], tok["limit_sps"])
    systems = comparison_systems(redis, args, payloads)
    celery = systems.get("celery", {}).get("samples_per_s")
    return {"curve": curve.describe(), "headrace": hr, "headrace_arrays": arrays,
            "ratio_arrays_to_limit": arrays["samples_per_s"] / smaller,
            "limits": limits, "smaller_limit_sps": smaller,
            "limited_by": "curve" if at_max["measured_sps"] <= tok["limit_sps"] else "tokenizer",
            "ratio_to_limit": hr["samples_per_s"] / smaller, "systems": systems,
            "ratio_to_celery": hr["samples_per_s"] / celery if celery else None,
            "ratio_arrays_to_celery": arrays["samples_per_s"] / celery if celery else None}


def request_capacity(redis: EmbeddedRedis, args: argparse.Namespace, payloads: Payloads) -> dict[str, Any]:
    """The most single-sample requests/s the stand-in worker answers when each is its own
    ``submit`` (the traffic of (c)): a closed loop of ``--c-concurrency`` callers."""
    ns = f"dp-{uuid.uuid4().hex[:6]}"
    with bench_workers(redis, args, ns):
        async def closed() -> dict[str, Any]:
            async with AsyncClient(redis.url, namespace=ns, timeout_s=60.0) as client:
                return await closed_run(HeadraceTarget(client, "minilm-standin", payloads), args.c_concurrency, args)

        return asyncio.run(closed())


def part_c(redis: EmbeddedRedis, args: argparse.Namespace, payloads: Payloads, b: dict[str, Any] | None
           ) -> dict[str, Any]:
    if b is None:  # (c) alone: measure what it is based on
        curve = LatencyCurve.load(args.curve, args.standin)
        limit = min(curve_limit(curve, args.max_batch, args.limit_s)["measured_sps"],
                    tokenizer_limit(args.threads, args.max_batch, args.limit_s)["limit_sps"])
        sustained = headrace_saturation(redis, args, standin=True)["samples_per_s"]
    else:
        limit, sustained = b["smaller_limit_sps"], b["headrace"]["samples_per_s"]
    capacity = request_capacity(redis, args, payloads)
    bases = {"smaller limit": limit, "headrace (b) throughput": sustained,
             "single-request capacity": capacity["samples_per_s"]}
    basis = min(bases, key=lambda k: bases[k])
    rate = args.load * bases[basis]
    limits = run_limits(args)
    floor_box: list[dict[str, Any]] = []
    floor = threading.Thread(target=lambda: floor_box.append(
        stream_round_trip_floor(redis.url, rate, args.duration_s, args.warmup_s, args.seed)), daemon=True)
    servable = make_standin(args.standin, args.curve, args.max_batch)

    async def reference() -> Any:
        async with InProcessTarget(servable, payloads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms) as t:
            return await open_loop(t, rate, limits, seed=args.seed)

    floor.start()
    ref = asyncio.run(reference())
    floor.join(args.duration_s + args.warmup_s + 120)
    with tempfile.TemporaryDirectory(prefix="headrace-dp-") as tmp:
        probe_file = str(Path(tmp) / "probes.jsonl")
        ns = f"dp-{uuid.uuid4().hex[:6]}"
        with bench_workers(redis, args, ns, probe_file=probe_file):
            async def probed() -> Any:
                async with AsyncClient(redis.url, namespace=ns, timeout_s=60.0) as client:
                    return await open_loop(HeadraceTarget(client, "minilm-standin", payloads), rate, limits,
                                           seed=args.seed)

            rr = asyncio.run(probed())
        probes = load_probes(probe_file)
    opened = summarize(rr.samples, label="headrace", mode="open", start_s=rr.start_s, end_s=rr.end_s,
                       offered_rps=rate, extra=rr.generator_stats())
    refp = summarize(ref.samples, label="in-process", mode="open", start_s=ref.start_s, end_s=ref.end_s,
                     offered_rps=rate)
    return {"rate_sps": rate, "rate_basis": basis, "bases_sps": bases, "capacity": capacity,
            "queue_split": queue_split(rr, probes), "floor": floor_box[0] if floor_box else None,
            "e2e": opened.to_json(), "reference": refp.to_json(), "load_average": loadavg()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    os.environ.update(thread_env(args.threads))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    payloads = text_payloads(512, seed=args.seed)
    console = Console(stderr=True)
    res: dict[str, Any] = {}
    with EmbeddedRedis() as redis:
        if "a" in parts:
            console.print("[bold](a)[/] bare ceiling and headrace with the zero-cost model ...")
            res["a"] = part_a(redis, args)
        if "b" in parts:
            console.print("[bold](b)[/] accelerator stand-in (SIMULATION): headrace, limits, comparison systems ...")
            res["b"] = part_b(redis, args, payloads)
        if "c" in parts:
            console.print("[bold](c)[/] queue overhead at half load vs the floor ...")
            res["c"] = part_c(redis, args, payloads, res.get("b"))
    doc = {"benchmark": "dataplane", "started_at": started, "wall_s": round(time.monotonic() - t0, 1),
           "host": host_info(), "args": vars(args), "payloads": payloads.describe(), "results": res}
    out = Console()
    for table in report.tables(doc):
        out.print(table)
    md = report.markdown(doc)
    print(md)
    write_json(args.json, doc)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
