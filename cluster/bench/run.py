"""``headrace bench``: put a model under measured load through Redis.

Closed loop (``--concurrency 1,8,64``: that many submitters, each waits for its answer) or
open loop (``--rate 50,100,200``: Poisson arrivals at those rates). Per load level it
reports throughput, end-to-end p50/p90/p99 and the split into queue wait, inference and
delivery (see :mod:`headrace.cluster.bench.stats`), the batch-size distribution and the
errors; as a rich table, as JSON (``--json``) and as a PNG of latency against offered
load (``--plot``).

Bounded: every level lasts ``warmup_s + duration_s`` plus at most ``timeout_s`` for the
last answers, sends at most ``max_requests``, and the whole run must fit ``max_total_s``
(checked before it starts). It talks only to the Redis it is given.

Module-level imports stay light (click + stdlib); the CLI imports this module at start-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

import click

from headrace.client.config import DEFAULT_NAMESPACE, Settings, require, validate_model_name, validate_namespace

if TYPE_CHECKING:
    from headrace.cluster.bench.stats import LoadPoint

log = logging.getLogger(__name__)

MODES = ("closed", "open")


@dataclasses.dataclass(frozen=True)
class BenchSettings(Settings):
    """What ``headrace bench`` runs (env overrides: ``HEADRACE_BENCH_<FIELD>``).

    Attributes:
        model: served model name.
        redis_url / namespace: where the model's stream is (empty URL: ``HEADRACE_REDIS_URL``
            or the local default).
        mode: ``closed`` or ``open``.
        concurrency: closed loop, submitters per level (one level each).
        rates_rps: open loop, Poisson arrival rates in requests/s (one level each).
        duration_s: measured window per level (s).
        warmup_s: load before the window opens, per level (s).
        max_requests: most requests sent per level.
        timeout_s: longest wait for one answer (s).
        max_total_s: upper bound of the whole run (s), checked before it starts.
        seed: seed of the input pool and of the arrival schedule.
        pool_size: distinct inputs cycled through.
        text_file: send the lines of this file as text inputs.
        dynamic_len: length given to dynamic tensor axes.
        max_in_flight: open loop, requests out at once before new arrivals are shed.
        require_worker: refuse to start when no live worker has registered the model.
    """

    env_prefix: ClassVar[str] = "HEADRACE_BENCH_"

    model: str = "minilm"
    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    mode: str = "closed"
    concurrency: tuple[int, ...] = (32,)
    rates_rps: tuple[float, ...] = ()
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = 200_000
    timeout_s: float = 30.0
    max_total_s: float = 1800.0
    seed: int = 0
    pool_size: int = 512
    text_file: str = ""
    dynamic_len: int = 16
    max_in_flight: int = 10_000
    require_worker: bool = True

    def validate(self) -> None:
        p = self.env_prefix
        validate_model_name(self.model)
        validate_namespace(self.namespace)
        require(self.mode in MODES, "mode", f"must be one of {list(MODES)}", p)
        if self.mode == "closed":
            require(bool(self.concurrency) and all(1 <= c <= 100_000 for c in self.concurrency), "concurrency",
                    "give one or more submitter counts between 1 and 100000, e.g. 1,8,64", p)
        else:
            require(bool(self.rates_rps) and all(0 < r <= 1e6 for r in self.rates_rps), "rates_rps",
                    "open loop needs one or more rates in requests/s, e.g. --rate 50,100", p)
        require(self.duration_s > 0, "duration_s", "must be > 0 s", p)
        require(self.warmup_s >= 0, "warmup_s", "must be >= 0 s", p)
        require(self.max_requests >= 1, "max_requests", "must be >= 1", p)
        require(self.timeout_s > 0, "timeout_s", "must be > 0 s", p)
        require(self.pool_size >= 1, "pool_size", "must be >= 1", p)
        require(self.dynamic_len >= 1, "dynamic_len", "must be >= 1", p)
        require(self.max_in_flight >= 1, "max_in_flight", "must be >= 1", p)
        require(self.worst_case_s <= self.max_total_s, "max_total_s",
                f"the run could take {self.worst_case_s:.0f}s ({len(self.levels)} levels x (warm-up + duration + "
                f"timeout)); shorten it or raise max_total_s", p)

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(float(c) for c in self.concurrency) if self.mode == "closed" else tuple(self.rates_rps)

    @property
    def worst_case_s(self) -> float:
        return len(self.levels) * (self.warmup_s + self.duration_s + self.timeout_s + 5.0)


@dataclass
class BenchReport:
    """Everything one ``headrace bench`` run measured (JSON via :meth:`to_json`)."""

    model: str
    mode: str
    started_at: str
    host: dict[str, Any]
    settings: dict[str, Any]
    payloads: dict[str, Any]
    workers: list[str]
    points: list[LoadPoint] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.mode, "started_at": self.started_at, "host": self.host,
                "settings": self.settings, "payloads": self.payloads, "workers": self.workers,
                "points": [p.to_json() for p in self.points]}


def host_info() -> dict[str, Any]:
    """Where a benchmark ran (for reports)."""
    return {"hostname": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(terse=True)}


async def run_bench_async(settings: BenchSettings, *, progress: bool = True) -> BenchReport:
    """Run every load level of ``settings`` against the model's workers.

    Raises:
        BrokerError: Redis is unreachable.
        ModelNotFoundError: no live worker registered the model (with ``require_worker``).
        ConfigError: the inputs cannot be made (see :func:`~headrace.cluster.bench.targets.payloads_for`).
    """
    import redis.asyncio as aioredis

    from headrace.client import errors as E
    from headrace.client.aio import AsyncClient
    from headrace.client.registry import aread_model
    from headrace.cluster.bench.load import RunLimits, Ticker, closed_loop, open_loop
    from headrace.cluster.bench.stats import summarize
    from headrace.cluster.bench.targets import HeadraceTarget, payloads_for

    async with AsyncClient(settings.redis_url or None, namespace=settings.namespace,
                           timeout_s=settings.timeout_s) as client:
        await client.ping()
        url = client.settings.effective_redis_url
        r = aioredis.Redis.from_url(url)
        try:
            record, now_ms = await aread_model(r, settings.namespace, settings.model)
        finally:
            await r.aclose()
        workers = [w.consumer for w in record.live_workers(now_ms)] if record else []
        describe = dict(sig) if record and (sig := record.signature()) is not None else None
        if settings.require_worker and not workers:
            raise E.ModelNotFoundError(
                f"no live worker serves {settings.model!r} in namespace {settings.namespace!r}; start one "
                f"(headrace worker --model {settings.model}) or pass --no-require-worker")
        payloads = payloads_for(describe, settings.pool_size, seed=settings.seed,
                                text_file=settings.text_file or None, dynamic_len=settings.dynamic_len)
        report = BenchReport(model=settings.model, mode=settings.mode,
                             started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             host=host_info(), settings=_json_settings(settings), payloads=payloads.describe(),
                             workers=workers)
        target = HeadraceTarget(client, settings.model, payloads)
        limits = RunLimits(settings.duration_s, settings.warmup_s, settings.max_requests, settings.timeout_s)
        offset = 0
        for level in settings.levels:
            label = f"c={int(level)}" if settings.mode == "closed" else f"{level:g}/s"
            async with Ticker(limits.total_s, f"{settings.model} {label}", enabled=progress) as tick:
                if settings.mode == "closed":
                    rr = await closed_loop(_Offset(target, offset), int(level), limits, progress=tick)
                else:
                    rr = await open_loop(_Offset(target, offset), level, limits, seed=settings.seed + offset,
                                         max_in_flight=settings.max_in_flight, progress=tick)
            offset += len(rr.samples)
            point = summarize(rr.samples, label=label, mode=settings.mode, start_s=rr.start_s, end_s=rr.end_s,
                              concurrency=int(level) if settings.mode == "closed" else None,
                              offered_rps=level if settings.mode == "open" else None, extra=rr.generator_stats())
            report.points.append(point)
            log.info("%s %s: %.1f ok/s, p50 %s ms", settings.model, label, point.throughput_rps, point.e2e.p50)
    return report


class _Offset:
    """A target whose request indices continue where the previous level stopped, so every
    level does not start with the same (cache-warm) inputs."""

    def __init__(self, inner: Any, offset: int) -> None:
        self.inner, self.offset, self.name = inner, offset, inner.name

    async def call(self, index: int, timeout_s: float) -> Any:
        return await self.inner.call(index + self.offset, timeout_s)


def _json_settings(settings: BenchSettings) -> dict[str, Any]:
    d = settings.to_dict()
    d.pop("redis_url", None)  # may carry a password
    return d


def batch_summary(batches: dict[int, float], top: int = 3) -> str:
    """The most frequent batch sizes as ``size x batches``, e.g. ``32x40 17x2``."""
    common = sorted(batches.items(), key=lambda kv: -kv[1])[:top]
    return " ".join(f"{size}x{n:.0f}" for size, n in common) or "-"


def report_table(report: BenchReport) -> Any:
    """A rich table of the report's load levels (latencies in ms)."""
    from rich.table import Table

    from headrace.cluster.bench.stats import fmt_ms

    t = Table(title=f"headrace bench {report.model} ({report.mode} loop, {len(report.workers)} worker(s), "
                    f"{report.payloads.get('kind')} inputs; ms)")
    cols = ("load", "sent/s", "ok/s", "errors", "e2e p50/p90/p99", "queue p50/p99", "infer p50",
            "delivery p50/p99", "mean batch", "batch sizes")
    for c in cols:
        t.add_column(c, justify="right")
    for p in report.points:
        errs = ", ".join(f"{k}={v}" for k, v in sorted(p.errors.items())) or "0"
        t.add_row(p.label, f"{p.achieved_rps:.1f}", f"{p.throughput_rps:.1f}", errs,
                  f"{fmt_ms(p.e2e.p50, 2)}/{fmt_ms(p.e2e.p90, 2)}/{fmt_ms(p.e2e.p99, 2)}",
                  f"{fmt_ms(p.queue.p50)}/{fmt_ms(p.queue.p99)}", fmt_ms(p.infer.p50),
                  f"{fmt_ms(p.delivery.p50)}/{fmt_ms(p.delivery.p99)}",
                  "-" if p.mean_batch is None else f"{p.mean_batch:.1f}", batch_summary(p.batches))
    return t


def _numbers(raw: str, kind: type, what: str) -> tuple[Any, ...]:
    try:
        return tuple(kind(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError as e:
        raise click.BadParameter(f"{what} must be a comma-separated list of numbers, got {raw!r}") from e


@click.command("bench")
@click.argument("model")
@click.option("--mode", type=click.Choice(MODES), default="closed",
              help="closed: N submitters each waiting for its answer; open: Poisson arrivals at a fixed rate.")
@click.option("--concurrency", default="32", help="Closed loop: comma-separated submitter counts, one level each.")
@click.option("--rate", "rates", default="", help="Open loop: comma-separated arrival rates (requests/s).")
@click.option("--duration-s", type=float, default=10.0, help="Measured window per level (s).")
@click.option("--warmup-s", type=float, default=2.0, help="Load before each window opens (s).")
@click.option("--max-requests", type=int, default=200_000, help="Most requests per level.")
@click.option("--timeout-s", type=float, default=30.0, help="Longest wait for one answer (s).")
@click.option("--max-total-s", type=float, default=1800.0, help="Refuse runs that could take longer (s).")
@click.option("--seed", type=int, default=0, help="Seed of inputs and arrivals.")
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Send these lines as text inputs (default: what the worker registered; text models get "
                   "real sentences from the offline corpus).")
@click.option("--require-worker/--no-require-worker", default=True,
              help="Refuse to start when no live worker has registered MODEL.")
@click.option("--json", "json_path", default=None, help="Write the JSON report here ('-' = stdout).")
@click.option("--plot", "plot_path", default=None, help="Write a PNG of latency vs offered load here.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per level.")
@click.pass_obj
def bench(cfg: Any, model: str, mode: str, concurrency: str, rates: str, json_path: str | None,
          plot_path: str | None, progress: bool, text_file: str | None, **opts: Any) -> None:
    """Load MODEL through Redis and report throughput, latency percentiles and their split,
    batch sizes and errors (e.g. `headrace bench minilm --mode open --rate 50,100 --json out.json`)."""
    from rich.console import Console

    settings = BenchSettings(
        model=model, redis_url=getattr(cfg, "redis_url", None) or "",
        namespace=getattr(cfg, "namespace", None) or DEFAULT_NAMESPACE, mode=mode,
        concurrency=_numbers(concurrency, int, "--concurrency") if mode == "closed" else (32,),
        rates_rps=_numbers(rates, float, "--rate") if mode == "open" else (), text_file=text_file or "", **opts)
    report = asyncio.run(run_bench_async(settings, progress=progress))
    console = Console(stderr=json_path == "-")
    console.print(report_table(report))
    if json_path == "-":
        click.echo(json.dumps(report.to_json(), indent=2))
    elif json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=2)
        console.print(f"JSON report: {json_path}")
    if plot_path:
        from headrace.cluster.bench.plot import plot_latency_vs_load

        plot_latency_vs_load({model: report.points}, plot_path,
                             title=f"headrace bench {model} ({mode} loop)")
        console.print(f"plot: {plot_path}")

