"""headrace side by side with what Ray Serve offers, one run, same machine, same model
artifact, same Redis, same threads.

Systems, per model artifact (MiniLM INT8 and fp32 by default):

* ``raw``: the limit. The servable the worker uses, in this process, on back-to-back
  batches of 1, 8 and ``--batch`` (no queue); for latency, the worker's own batcher and
  servable in process under the same Poisson arrivals (``InProcessTarget``).
* ``standalone``: a headrace worker process (``python -m headrace.workers``).
* ``ray1`` / ``ray2``: headrace's Ray Serve app (``headrace.cluster.serve.app:build_app``) with 1
  and 2 replicas; the threads are split between the replicas (2 replicas x 1 thread for
  ``--threads 2``), so every system has the same number of model threads.
* ``celery``: Ray Serve asynchronous inference (``@task_consumer`` + Celery adapter on the
  same Redis), one task per request as Ray's documentation shows.
* ``http``: Ray Serve HTTP with ``@serve.batch`` (same max batch and wait as the worker).

Each system gets a closed-loop run (``--concurrency`` requests outstanding: saturation
throughput, reported as a ratio to the raw limit) and open-loop Poisson runs at ``--loads``
x the raw limit (p50/p99 at 50% and 80% of the limit's throughput). An open-loop level a
system cannot sustain (its closed-loop throughput is below the rate) is not run and shows
as "overloaded". The raw limit is measured again at the end to show drift.

Prints tables, writes JSON and PNG plots (latency vs offered load, throughput bars).
Asserts nothing about speed.

    .venv/bin/python -m benchmarks.compare --threads 2 --batch 32 [--models int8,fp32] \\
        [--systems standalone,ray1,ray2,celery,http] [--json runs/compare.json] [--plot-dir docs/img]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.compare_report import LABELS, parse_loads, plots, render, replot
from benchmarks.lib.models import ensure_benchmark_models
from benchmarks.lib.output import write_json
from benchmarks.lib.systems import (
    CpuMeter,
    WorkerProcesses,
    pin_threads,
    set_ort_spin,
    thread_env,
    wait_for_workers,
)
from headrace.client.aio import AsyncClient
from headrace.cluster.bench.load import RunLimits, Ticker, closed_loop, open_loop
from headrace.cluster.bench.run import host_info
from headrace.cluster.bench.stats import LoadPoint, summarize
from headrace.cluster.bench.targets import HeadraceTarget, InProcessTarget, Payloads, raw_throughput, text_payloads
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_port
from headrace.workers.backends import load_servable
from headrace.workers.settings import WorkerSettings

log = logging.getLogger("compare")
ALL_SYSTEMS = ("standalone", "ray1", "ray2", "celery", "http")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default="model_repo", help="model repository (MiniLM built/quantized if needed)")
    ap.add_argument("--models", default="int8,fp32", help="comma list of int8 / fp32")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {', '.join(ALL_SYSTEMS)}")
    ap.add_argument("--threads", type=int, default=2, help="model threads per system (split across replicas)")
    ap.add_argument("--batch", type=int, default=32, help="max batch everywhere; raw limit batch size")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait everywhere")
    ap.add_argument("--raw-s", type=float, default=6.0, help="seconds per raw measurement")
    ap.add_argument("--duration-s", type=float, default=10.0, help="measured window of each load run")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=0, help="closed-loop outstanding requests (0 = 3 x batch)")
    ap.add_argument("--loads", default="0.5,0.8", help="open-loop rates as fractions of the raw limit")
    ap.add_argument("--celery-concurrency", type=int, default=5,
                    help="Celery worker threads (Ray's default max_ongoing_requests is 5)")
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--pool", type=int, default=512, help="distinct real sentences cycled through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="runs/compare.json")
    ap.add_argument("--plot-dir", default="runs", help="PNG plots go here")
    ap.add_argument("--ort-spin", choices=("on", "off"), default="on",
                    help="off: every system's ONNX Runtime sessions run without intra-op spin-wait "
                         "(sets HEADRACE_ORT_SPIN for every compared system)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--replot", default="", metavar="JSON",
                    help="only redraw the plots (and tables) of an earlier run's JSON into --plot-dir")
    return ap.parse_args()


# --- systems as async context managers yielding a load target ------------------------------

SystemFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


class Env:
    """What every system of one model shares."""

    def __init__(self, args: argparse.Namespace, redis: EmbeddedRedis, manifest: Any, payloads: Payloads,
                 http_port: int) -> None:
        self.args, self.redis, self.manifest, self.payloads, self.http_port = args, redis, manifest, payloads, http_port
        self.repo = str(Path(args.repo).absolute())
        self.conc = args.concurrency or 3 * args.batch

    def settings(self, threads: int) -> WorkerSettings:
        return WorkerSettings.from_env(model=self.manifest.name, version=self.manifest.version, model_repo=self.repo,
                              intra_op_threads=threads, max_batch=self.args.batch, max_wait_ms=self.args.max_wait_ms)


@contextlib.asynccontextmanager
async def standalone(env: Env) -> AsyncIterator[Any]:
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    flags = {"max_batch": env.args.batch, "max_wait_ms": env.args.max_wait_ms}
    with WorkerProcesses(env.redis.url, ns, env.manifest.name, version=env.manifest.version, model_repo=env.repo,
                         threads=env.args.threads, settings=flags):
        async with AsyncClient(env.redis.url, namespace=ns, timeout_s=env.args.timeout_s) as client:
            yield HeadraceTarget(client, env.manifest.name, env.payloads, name="standalone")


@contextlib.asynccontextmanager
async def ray_app(env: Env, replicas: int) -> AsyncIterator[Any]:
    from ray import serve

    from headrace.cluster.serve.app import build_app

    ns = f"bench-{uuid.uuid4().hex[:6]}"
    name = f"bench-{ns}"
    threads = max(1, env.args.threads // replicas)
    args = {"model": env.manifest.name, "version": env.manifest.version, "redis_url": env.redis.url,
            "namespace": ns, "model_repo": env.repo, "num_replicas": replicas, "max_batch": env.args.batch,
            "max_wait_ms": env.args.max_wait_ms, "intra_op_threads": threads, "num_cpus": 1.0}
    await asyncio.to_thread(serve.run, build_app(args), name=name, route_prefix=None)
    try:
        await asyncio.to_thread(wait_for_workers, env.redis.url, ns, env.manifest.name, replicas, 300.0)
        async with AsyncClient(env.redis.url, namespace=ns, timeout_s=env.args.timeout_s) as client:
            yield HeadraceTarget(client, env.manifest.name, env.payloads, name=f"ray{replicas}")
    finally:
        await asyncio.to_thread(serve.delete, name)


@contextlib.asynccontextmanager
async def celery(env: Env) -> AsyncIterator[Any]:
    from ray import serve

    from benchmarks.lib.baselines import CeleryTarget, build_celery_app, purge_celery_queue

    queue = f"bench-{uuid.uuid4().hex[:6]}"
    app = build_celery_app(env.redis.url, queue, model_repo=env.repo, model=env.manifest.name,
                           version=env.manifest.version, threads=env.args.threads,
                           max_ongoing_requests=env.args.celery_concurrency)
    await asyncio.to_thread(serve.run, app, name=queue, route_prefix=None)
    target = CeleryTarget(env.redis.url, queue, env.payloads, threads=env.conc, name="celery")
    try:
        # The consumer starts in a thread of the replica; the first answered task says it is up.
        first = await target.call(0, 300.0)
        if first.status != "ok":
            raise RuntimeError(f"the Celery consumer did not answer a first task: {first}")
        yield target
    finally:
        target.close()
        await asyncio.to_thread(serve.delete, queue)
        await asyncio.to_thread(purge_celery_queue, env.redis.url, queue)


@contextlib.asynccontextmanager
async def http(env: Env) -> AsyncIterator[Any]:
    from ray import serve

    from benchmarks.lib.baselines import HttpTarget, build_http_batch_app

    name = f"bench-http-{uuid.uuid4().hex[:6]}"
    app = build_http_batch_app(model_repo=env.repo, model=env.manifest.name, version=env.manifest.version,
                               threads=env.args.threads, max_batch=env.args.batch, max_wait_ms=env.args.max_wait_ms,
                               max_ongoing_requests=max(256, 2 * env.conc))
    await asyncio.to_thread(serve.run, app, name=name, route_prefix=f"/{name}")
    try:
        async with HttpTarget(f"http://127.0.0.1:{env.http_port}/{name}", env.payloads,
                              max_conns=2 * env.conc, name="http") as target:
            first = await target.call(0, 120.0)
            if first.status != "ok":
                raise RuntimeError(f"the HTTP deployment did not answer: {first}")
            yield target
    finally:
        await asyncio.to_thread(serve.delete, name)


def factories(env: Env) -> dict[str, SystemFactory]:
    return {"standalone": lambda: standalone(env), "ray1": lambda: ray_app(env, 1), "ray2": lambda: ray_app(env, 2),
            "celery": lambda: celery(env), "http": lambda: http(env)}


# --- measuring -------------------------------------------------------------------------------


def point(rr: Any, label: str, mode: str, **kw: Any) -> LoadPoint:
    return summarize(rr.samples, label=label, mode=mode, start_s=rr.start_s, end_s=rr.end_s,
                     extra=rr.generator_stats(), **kw)


async def load_system(name: str, target: Any, env: Env, rates: list[float], progress: bool) -> dict[str, Any]:
    args = env.args
    limits = RunLimits(args.duration_s, args.warmup_s, 10_000_000, args.timeout_s)
    meter = CpuMeter().start()
    async with Ticker(limits.total_s, f"{name} closed c={env.conc}", progress) as tick:
        rr = await closed_loop(target, env.conc, limits, progress=tick)
    meter.stop()
    closed = point(rr, f"{name} c={env.conc}", "closed", concurrency=env.conc)
    closed.extra["cpu_us_per_request"] = meter.per_request_us(sum(1 for x in rr.samples if x.ok))
    opened: dict[str, Any] = {}
    for frac, rate in zip(parse_loads(args.loads), rates, strict=True):
        key = f"{frac:.0%}"
        if closed.throughput_rps < rate:
            opened[key] = {"overloaded": True, "offered_rps": rate, "sustained_rps": closed.throughput_rps}
            continue
        async with Ticker(limits.total_s, f"{name} {rate:.0f}/s", progress) as tick:
            rr = await open_loop(target, rate, limits, seed=args.seed, max_in_flight=8 * env.conc, progress=tick)
        opened[key] = point(rr, f"{name} {rate:.0f}/s", "open", offered_rps=rate).to_json()
    return {"closed": closed.to_json(), "open": opened}


async def reference(servable: Any, env: Env, rates: list[float], progress: bool) -> dict[str, Any]:
    args = env.args
    limits = RunLimits(args.duration_s, args.warmup_s, 10_000_000, args.timeout_s)
    opened: dict[str, Any] = {}
    async with InProcessTarget(servable, env.payloads, max_batch=args.batch, max_wait_ms=args.max_wait_ms) as target:
        for frac, rate in zip(parse_loads(args.loads), rates, strict=True):
            async with Ticker(limits.total_s, f"raw {rate:.0f}/s", progress) as tick:
                rr = await open_loop(target, rate, limits, seed=args.seed, progress=tick)
            opened[f"{frac:.0%}"] = point(rr, f"raw {rate:.0f}/s", "open", offered_rps=rate).to_json()
    return opened


def timed_raw(servable: Any, payloads: Payloads, batch: int, seconds: float) -> dict[str, float]:
    """A raw run plus its CPU microseconds per request (this process: the model's threads)."""
    c0 = time.process_time()
    r = raw_throughput(servable, payloads, batch, seconds)
    r["cpu_us_per_request"] = (time.process_time() - c0) * 1e6 / (r["rps"] * r["seconds"])
    return r


def compare_model(kind: str, manifest: Any, redis: EmbeddedRedis, payloads: Payloads, args: argparse.Namespace,
                  http_port: int, systems: list[str]) -> dict[str, Any]:
    env = Env(args, redis, manifest, payloads, http_port)
    progress = not args.no_progress
    console = Console(stderr=True)
    servable = load_servable(env.settings(args.threads), providers=["CPUExecutionProvider"])
    try:
        raw = {str(b): timed_raw(servable, payloads, b, args.raw_s) for b in sorted({1, 8, args.batch})}
        limit = raw[str(args.batch)]["rps"]
        rates = [f * limit for f in parse_loads(args.loads)]
        console.print(f"[bold]{manifest.name}/{manifest.version}[/]: raw limit {limit:.1f}/s at batch {args.batch}")
        out: dict[str, Any] = {"model": f"{manifest.name}/{manifest.version}", "precision": manifest.precision,
                               "raw": raw, "limit_rps": limit, "rates": rates, "systems": {}}
        out["systems"]["raw"] = {"closed": None, "open": asyncio.run(reference(servable, env, rates, progress))}
    finally:
        servable.close()
    made = factories(env)

    async def one(name: str) -> dict[str, Any]:
        async with made[name]() as target:
            return await load_system(name, target, env, rates, progress)

    for name in systems:
        t0 = time.monotonic()
        try:
            out["systems"][name] = asyncio.run(one(name))
        except Exception as e:  # noqa: BLE001 - one broken system must not lose the others' figures
            log.exception("system %s failed", name)
            out["systems"][name] = {"failed": f"{type(e).__name__}: {e}"}
        console.print(f"  {LABELS[name]}: done in {time.monotonic() - t0:.0f}s")
    servable = load_servable(env.settings(args.threads), providers=["CPUExecutionProvider"])
    try:
        out["raw_after"] = timed_raw(servable, payloads, args.batch, args.raw_s)
    finally:
        servable.close()
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replot:
        replot(args.replot, args.plot_dir)
        return
    pin_threads(args.threads)
    set_ort_spin(args.ort_spin == "on")
    kinds = tuple(k.strip() for k in args.models.split(",") if k.strip())
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    manifests = ensure_benchmark_models(args.repo, kinds)
    payloads = text_payloads(args.pool, seed=args.seed)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    http_port = free_port()
    uses_ray = any(s != "standalone" for s in systems)
    results: dict[str, Any] = {}
    with EmbeddedRedis() as redis:
        if uses_ray:
            import ray
            from ray import serve

            # address="local": a private Ray cluster, never one another process started here.
            ray.init(address="local", num_cpus=max(4, 2 * args.threads), include_dashboard=False,
                     log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {**thread_env(args.threads), **(
                         {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {})}})
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        try:
            for kind in kinds:
                results[kind] = compare_model(kind, manifests[kind], redis, payloads, args, http_port, systems)
        finally:
            if uses_ray:
                serve.shutdown()
                ray.shutdown()
    console = Console()
    pngs = []
    for kind, res in results.items():
        console.print(render(res, args))
        pngs += plots(res, kind, args)
    doc = {"benchmark": "compare", "started_at": started, "wall_s": round(time.monotonic() - t0, 1),
           "host": host_info(), "args": vars(args), "payloads": payloads.describe(), "results": results,
           "plots": pngs}
    write_json(args.json, doc)
    console.print(f"JSON: {args.json}; plots: {', '.join(pngs)}")


if __name__ == "__main__":
    main()
