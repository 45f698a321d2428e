"""The data plane's cost: raw backend throughput vs end-to-end through Redis, same model,
same batch size, same threads, one run.

For each model artifact (MiniLM INT8 and fp32 by default):

1. **raw limit**: the servable the worker uses (tokenise, length buckets, ONNX Runtime,
   split) on back-to-back batches of ``--batch`` real sentences, in this process.
2. **end-to-end**: a standalone worker process (``python -m headrace.workers``, same
   threads, ``max_batch = --batch``) on a private Redis, loaded by the asyncio SDK in
   closed loop with ``--concurrency`` requests outstanding. Raw and end-to-end alternate
   (raw, e2e, raw, e2e, ..., raw) so drift of the shared machine hits both; the ratio is
   end-to-end over the mean of the raw runs around each round.
3. **queue overhead at half load**: Poisson arrivals at ``--load`` x the raw limit through
   a probed worker (``benchmarks.lib.probe``: the same worker loop, broker and
   servable, with timestamps). Per request, queue overhead = send -> worker read
   + commit start -> client decoded (see ``bench_probe.split_overhead``); the
   worker's own serving time (batch formation, waiting for and running the model) is not
   overhead. Cross-check: the same arrivals into an in-process reference (the worker's
   batcher and servable, no Redis), compared percentile by percentile.
4. **the floor** under that overhead: a bare Redis Streams round trip (two plain redis-py
   processes, ``XADD`` -> ``XREADGROUP`` -> ``XADD`` -> ``XREAD``; see
   ``benchmarks.lib.floor``) at the same arrival rate on the same Redis, taken while
   the in-process reference keeps the model as busy as in the probed run: what this
   machine's scheduler, loopback and Redis cost for the two hops every request takes.

Prints a table and writes JSON. Asserts nothing about speed.

    .venv/bin/python -m benchmarks.e2e_vs_raw --threads 2 --batch 32 [--models int8,fp32] [--json runs/e2e_vs_raw.json]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.lib.floor import stream_round_trip_floor
from benchmarks.lib.models import ensure_benchmark_models
from benchmarks.lib.output import write_json
from benchmarks.lib.probe import PROBE_ENV, load_probes, queue_split
from benchmarks.lib.systems import WorkerProcesses, pin_threads, process_cpu_s, set_ort_spin
from headrace.client.aio import AsyncClient
from headrace.cluster.bench.load import RunLimits, Ticker, closed_loop, open_loop
from headrace.cluster.bench.run import host_info
from headrace.cluster.bench.stats import LoadPoint, fmt_ms, overhead, summarize
from headrace.cluster.bench.targets import HeadraceTarget, InProcessTarget, Payloads, raw_throughput, text_payloads
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.backends import load_servable
from headrace.workers.settings import WorkerSettings

log = logging.getLogger("e2e_vs_raw")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="model_repo", help="model repository (MiniLM built/quantized if needed)")
    ap.add_argument("--models", default="int8,fp32", help="comma list of int8 / fp32")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads everywhere")
    ap.add_argument("--batch", type=int, default=32, help="raw batch size = worker max_batch")
    ap.add_argument("--instances", type=int, default=1,
                    help="model calls at once (worker `instances`; raw and reference run as many threads); "
                         "with --threads 1 and --instances 2 the model gets the same 2 threads in total")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="worker (and reference) batching wait")
    ap.add_argument("--raw-s", type=float, default=6.0, help="seconds per raw measurement")
    ap.add_argument("--rounds", type=int, default=3, help="end-to-end rounds, each between two raw runs")
    ap.add_argument("--duration-s", type=float, default=15.0, help="measured window of each load run")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=0, help="closed-loop outstanding requests (0 = 3 x batch)")
    ap.add_argument("--load", type=float, default=0.5, help="fraction of the raw limit for the overhead runs")
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--pool", type=int, default=512, help="distinct real sentences cycled through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/e2e_vs_raw.json", help="write the figures here")
    ap.add_argument("--fake-rate", type=float, default=0.0,
                    help="also measure the queue overhead alone: a zero-cost fake model at this rate (req/s)")
    ap.add_argument("--ort-spin", choices=("on", "off"), default="on",
                    help="off: every system's ONNX Runtime sessions run without intra-op spin-wait "
                         "(sets HEADRACE_ORT_SPIN for every compared system)")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare Redis round-trip floor runs")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args()


def load_point(rr: Any, label: str, mode: str, **kw: Any) -> LoadPoint:
    return summarize(rr.samples, label=label, mode=mode, start_s=rr.start_s, end_s=rr.end_s,
                     extra=rr.generator_stats(), **kw)


async def reference_run(servable: Any, payloads: Payloads, args: argparse.Namespace, rate: float,
                        limits: RunLimits, progress: bool) -> LoadPoint:
    async with InProcessTarget(servable, payloads, max_batch=args.batch, max_wait_ms=args.max_wait_ms,
                               instances=args.instances) as target:
        async with Ticker(limits.total_s, f"reference {rate:.0f}/s", progress) as tick:
            rr = await open_loop(target, rate, limits, seed=args.seed, progress=tick)
    return load_point(rr, f"in-process {rate:.0f}/s", "open", offered_rps=rate)


def model_time(p: LoadPoint, rr: Any) -> LoadPoint:
    """Add how long the worker's model ran per request (each request's share of its
    model call) and how busy that kept the model, over the window."""
    shares = [s.infer_ms / s.batch_size for s in rr.samples
              if s.ok and s.infer_ms is not None and s.batch_size and rr.start_s <= s.sent_s < rr.end_s]
    per_req = sum(shares) / len(shares) if shares else None
    p.extra["model_ms_per_request"] = per_req
    p.extra["model_busy"] = None if per_req is None else p.throughput_rps * per_req / 1000.0
    return p


def timed_raw(servable: Any, payloads: Payloads, args: argparse.Namespace) -> dict[str, float]:
    """A raw run, plus this process' CPU microseconds per request during it."""
    c0 = time.process_time()
    r = raw_throughput(servable, payloads, args.batch, args.raw_s, instances=args.instances)
    r["cpu_us_per_request"] = (time.process_time() - c0) * 1e6 / (r["rps"] * r["seconds"])
    r["model_ms_per_request"] = 1000.0 / r["rps"]
    return r


async def throughput_rounds(url: str, ns: str, model: str, servable: Any, payloads: Payloads,
                            args: argparse.Namespace, limits: RunLimits, progress: bool, pids: dict[str, list[int]]
                            ) -> tuple[list[dict[str, float]], list[LoadPoint], list[dict[str, float]]]:
    """raw, e2e, raw, e2e, ..., raw: each e2e round is compared with the raw runs around it,
    so a slow drift of the (shared) machine does not pass for overhead. Also notes the CPU
    each process spent per answered request in every e2e round."""
    conc = args.concurrency or 3 * args.batch
    raws = [timed_raw(servable, payloads, args)]
    closed: list[LoadPoint] = []
    cpu: list[dict[str, float]] = []
    async with AsyncClient(url, namespace=ns, timeout_s=args.timeout_s) as client:
        target = HeadraceTarget(client, model, payloads)
        for k in range(args.rounds):
            before = {who: sum(process_cpu_s(p) for p in ps) for who, ps in pids.items()}
            c0 = time.process_time()
            async with Ticker(limits.total_s, f"headrace c={conc} round {k + 1}", progress) as tick:
                rr = await closed_loop(target, conc, limits, progress=tick)
            answered = max(1, sum(1 for s in rr.samples if s.ok))
            used = {who: sum(process_cpu_s(p) for p in ps) - before[who] for who, ps in pids.items()}
            used["client"] = time.process_time() - c0
            cpu.append({who: v * 1e6 / answered for who, v in used.items()})
            closed.append(model_time(load_point(rr, f"headrace c={conc}", "closed", concurrency=conc), rr))
            raws.append(timed_raw(servable, payloads, args))
    return raws, closed, cpu


async def probed_run(url: str, ns: str, model: str, payloads: Payloads, args: argparse.Namespace, rate: float,
                     limits: RunLimits, progress: bool) -> Any:
    async with AsyncClient(url, namespace=ns, timeout_s=args.timeout_s) as client:
        target = HeadraceTarget(client, model, payloads)
        async with Ticker(limits.total_s, f"headrace {rate:.0f}/s (probed)", progress) as tick:
            return await open_loop(target, rate, limits, seed=args.seed, progress=tick)


def measure_model(kind: str, manifest: Any, redis: EmbeddedRedis, payloads: Payloads,
                  args: argparse.Namespace) -> dict[str, Any]:
    progress = not args.no_progress
    repo = str(Path(args.repo).absolute())
    settings = WorkerSettings.from_env(model=manifest.name, version=manifest.version, model_repo=repo,
                              intra_op_threads=args.threads, max_batch=args.batch, max_wait_ms=args.max_wait_ms)
    limits = RunLimits(args.duration_s, args.warmup_s, 10_000_000, args.timeout_s)
    flags = {"max_batch": args.batch, "max_wait_ms": args.max_wait_ms, "instances": args.instances}
    common = {"version": manifest.version, "model_repo": repo, "threads": args.threads, "settings": flags}
    servable = load_servable(settings, providers=["CPUExecutionProvider"])
    try:
        ns = f"bench-{uuid.uuid4().hex[:6]}"
        with WorkerProcesses(redis.url, ns, manifest.name, **common) as workers:
            pids = {"worker": workers.pids, "redis": [redis.proc.pid] if redis.proc else []}
            raws, closed, cpu = asyncio.run(throughput_rounds(redis.url, ns, manifest.name, servable, payloads,
                                                              args, limits, progress, pids))
        raw_rps = sum(r["rps"] for r in raws) / len(raws)
        rounds = [{"raw_rps": (raws[k]["rps"] + raws[k + 1]["rps"]) / 2, "e2e_rps": c.throughput_rps,
                   "ratio": c.throughput_rps / ((raws[k]["rps"] + raws[k + 1]["rps"]) / 2)}
                  for k, c in enumerate(closed)]
        ratio = sum(r["e2e_rps"] for r in rounds) / sum(r["raw_rps"] for r in rounds)
        rate = args.load * raw_rps
        # The floor is taken while the in-process reference keeps the model as busy as the
        # probed run will: the bare round trip under the same CPU contention.
        floor_box: list[dict[str, Any]] = []
        floor_thread = None if args.no_floor else threading.Thread(
            target=lambda: floor_box.append(stream_round_trip_floor(redis.url, rate, args.duration_s, args.warmup_s,
                                                                    args.seed)), daemon=True)
        if floor_thread is not None:
            floor_thread.start()
        ref = asyncio.run(reference_run(servable, payloads, args, rate, limits, progress))
        if floor_thread is not None:
            floor_thread.join(args.duration_s + args.warmup_s + 60)
    finally:
        servable.close()
    with tempfile.TemporaryDirectory(prefix="headrace-probe-") as tmp:
        probe_file = str(Path(tmp) / "probes.jsonl")
        ns = f"bench-{uuid.uuid4().hex[:6]}"
        with WorkerProcesses(redis.url, ns, manifest.name, module="benchmarks.lib.probe",
                             env={PROBE_ENV: probe_file}, **common):
            rr = asyncio.run(probed_run(redis.url, ns, manifest.name, payloads, args, rate, limits, progress))
        probes = load_probes(probe_file)
    opened = load_point(rr, f"headrace {rate:.0f}/s", "open", offered_rps=rate)
    return {"floor": floor_box[0] if floor_box else None, "kind": kind, "model": f"{manifest.name}/{manifest.version}", "precision": manifest.precision,
            "raws": raws, "raw_rps": raw_rps, "rounds": rounds, "cpu_us_per_request": {
                "raw": sum(r["cpu_us_per_request"] for r in raws) / len(raws),
                **{who: sum(c[who] for c in cpu) / len(cpu) for who in cpu[0]}}, "e2e_rps": sum(c.throughput_rps for c in closed)
            / len(closed), "ratio": ratio, "load_rps": rate, "queue_split": queue_split(rr, probes),
            "vs_reference_ms": overhead(opened.e2e, ref.e2e), "closed": [c.to_json() for c in closed],
            "open": opened.to_json(), "reference": ref.to_json()}


def measure_fake(redis: EmbeddedRedis, args: argparse.Namespace) -> dict[str, Any]:
    """The queue overhead with no model cost: the probed worker serving the ``affine`` fake
    (microseconds per batch) under Poisson arrivals at ``--fake-rate``. What is left is
    what the data plane itself takes when the CPU is not busy with a model."""
    from headrace.cluster.bench.targets import tensor_payloads

    payloads = tensor_payloads([{"name": "x", "dtype": "float32", "shape": [4]}], args.pool, seed=args.seed)
    limits = RunLimits(args.duration_s, args.warmup_s, 10_000_000, args.timeout_s)
    with tempfile.TemporaryDirectory(prefix="headrace-probe-") as tmp:
        probe_file = str(Path(tmp) / "probes.jsonl")
        ns = f"bench-{uuid.uuid4().hex[:6]}"
        with WorkerProcesses(redis.url, ns, "affine", fake="affine", module="benchmarks.lib.probe",
                             env={PROBE_ENV: probe_file}, threads=args.threads,
                             settings={"max_batch": args.batch, "max_wait_ms": args.max_wait_ms}):
            rr = asyncio.run(probed_run(redis.url, ns, "affine", payloads, args, args.fake_rate, limits,
                                        not args.no_progress))
        probes = load_probes(probe_file)
    opened = load_point(rr, f"fake {args.fake_rate:.0f}/s", "open", offered_rps=args.fake_rate)
    floor = None if args.no_floor else stream_round_trip_floor(redis.url, args.fake_rate, args.duration_s,
                                                               args.warmup_s, args.seed)
    return {"rate_rps": args.fake_rate, "open": opened.to_json(), "queue_split": queue_split(rr, probes),
            "floor": floor}


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    t = Table(title=f"MiniLM: raw backend vs end-to-end through Redis (batch {args.batch}, {args.instances} x "
                    f"{args.threads} threads)")
    for c in ("model", "raw/s", "e2e/s", "e2e/raw (rounds)", f"load/s ({args.load:.0%})", "e2e p50/p99 ms",
              "queue overhead p50/p99 ms", "wire in / deliver p50 ms", "vs in-process p50/p99 ms", "errors"):
        t.add_column(c, justify="right")
    for r in results:
        o, q, vr = r["open"], r["queue_split"], r["vs_reference_ms"]
        errs = sum(sum(c["errors"].values()) for c in r["closed"]) + sum(o["errors"].values())
        qq = q.get("queue", {})
        t.add_row(f"{r['model']} ({r['precision']})", f"{r['raw_rps']:.1f}", f"{r['e2e_rps']:.1f}",
                  f"{100 * r['ratio']:.1f}% (" + ", ".join(f"{100 * x['ratio']:.0f}" for x in r["rounds"]) + ")",
                  f"{r['load_rps']:.0f}", f"{fmt_ms(o['e2e']['p50'], 1)}/{fmt_ms(o['e2e']['p99'], 1)}",
                  f"{fmt_ms(qq.get('p50'), 2)}/{fmt_ms(qq.get('p99'), 2)}",
                  "/".join(fmt_ms(q.get(k, {}).get("p50"), 2) for k in ("wire_in", "deliver")),
                  f"{fmt_ms(vr['p50'], 1)}/{fmt_ms(vr['p99'], 1)}", str(errs))
    return t


def floor_text(floor: dict[str, Any] | None) -> str:
    if not floor:
        return ""
    rt = floor["round_trip_ms"]
    return (f" (floor: bare Redis Streams round trip at {floor['rate_rps']:.0f}/s p50 {fmt_ms(rt.get('p50'), 2)} ms, "
            f"p99 {fmt_ms(rt.get('p99'), 2)} ms)")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_threads(args.threads)
    set_ort_spin(args.ort_spin == "on")
    kinds = tuple(k.strip() for k in args.models.split(",") if k.strip())
    manifests = ensure_benchmark_models(args.repo, kinds)
    payloads = text_payloads(args.pool, seed=args.seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    results = []
    fake: dict[str, Any] | None = None
    with EmbeddedRedis() as redis:
        for kind in kinds:
            results.append(measure_model(kind, manifests[kind], redis, payloads, args))
        if args.fake_rate > 0:
            fake = measure_fake(redis, args)
    console = Console()
    if fake is not None:
        fq = fake["queue_split"].get("queue", {})
        console.print(f"zero-cost model at {args.fake_rate:.0f}/s: queue overhead p50 {fmt_ms(fq.get('p50'), 2)} ms, "
                      f"p99 {fmt_ms(fq.get('p99'), 2)} ms{floor_text(fake.get('floor'))}")
    console.print(render(results, args))
    for r in results:
        cu = r["cpu_us_per_request"]
        console.print(f"{r['model']}: CPU per request (us): raw {cu['raw']:.0f}; end-to-end worker {cu['worker']:.0f} "
                      f"+ redis {cu['redis']:.0f} + load generator {cu['client']:.0f} = "
                      f"{cu['worker'] + cu['redis'] + cu['client']:.0f}")
        qq = r["queue_split"].get("queue", {})
        console.print(f"{r['model']}: end-to-end {r['e2e_rps']:.1f}/s = {100 * r['ratio']:.1f}% of raw "
                      f"{r['raw_rps']:.1f}/s; queue overhead at {args.load:.0%} load p50 "
                      f"{fmt_ms(qq.get('p50'), 2)} ms, p99 {fmt_ms(qq.get('p99'), 2)} ms"
                      f"{floor_text(r.get('floor'))}")
    doc = {"benchmark": "e2e_vs_raw", "started_at": started, "wall_s": round(time.monotonic() - t0, 1),
           "host": host_info(), "args": vars(args), "payloads": payloads.describe(), "results": results,
           "fake": fake}
    if args.json:
        write_json(args.json, doc)
        console.print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
