"""CPU microseconds per sample, stage by stage, of a real worker process under load.

One private Redis, one worker process (``benchmarks.lib.bench_worker``: the accelerator
stand-in, a SIMULATION, by default; ``--fake affine`` for the zero-cost model), and the SDK
load generator in a process of its own (``benchmarks.lib.saturate``: ``AsyncClient.imap``, or
``imap_arrays`` with ``--arrays BLOCK``,
``--in-flight`` outstanding). After the warm-up, py-spy samples the worker and the load
generator for ``--duration-s`` (``py-spy record --nonblocking --format raw``) while the
consumer group's ``entries-read`` counts the samples served; :mod:`benchmarks.lib.stages`
assigns each sampled stack to a stage (read, decode, admission, tokenise, batch build,
model call, encode results, commit; on the client: submit, reply read).

Prints a table of CPU us per sample by stage (each process' ``/proc`` CPU time split over
the stages in proportion to py-spy's samples, see :func:`benchmarks.lib.stages.apportion`;
the CPU of threads without a Python stack, e.g. the tokenizer's rayon pool, read per thread
from ``/proc/<pid>/task``, is a row of its own), the Redis commands per entry,
py-spy's active thread time per stage beside it, Redis' ``INFO CPU`` per sample, and writes JSON (and, with
``--speedscope DIR``, speedscope profiles to open at https://www.speedscope.app).
Needs ``py-spy`` (``pip install py-spy``) and permission to read the processes (same user).

    .venv/bin/python -m benchmarks.profile_worker [--fake affine] [--max-batch 256] [--duration-s 8] \\
        [--chunk 64] [--json runs/profile_worker.json] [--speedscope runs/speedscope]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from benchmarks.lib import stages
from benchmarks.lib.output import write_json
from benchmarks.lib.systems import WorkerProcesses, process_cpu_s, thread_cpu_s
from headrace.client.keys import ModelKeys
from headrace.cluster.bench.run import host_info
from headrace.cluster.ops.embedded_redis import EmbeddedRedis


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fake", choices=("affine",), default="", help="profile the zero-cost fake instead of the stand-in")
    ap.add_argument("--standin", default="cuda fp16", help="curve run of the stand-in (benchmarks/results)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="worker threads (math libraries, tokenizer pool)")
    ap.add_argument("--in-flight", type=int, default=1024, help="samples the load generator keeps outstanding")
    ap.add_argument("--chunk", type=int, default=1, help="samples per multi-sample entry (the SDK's chunk_size)")
    ap.add_argument("--arrays", type=int, default=0, metavar="BLOCK",
                    help="load generator on the SDK's array path (imap_arrays, blocks of BLOCK samples; --fake affine)")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--duration-s", type=float, default=8.0, help="profiled window")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--json", default="runs/profile_worker.json")
    ap.add_argument("--speedscope", default="", help="also write speedscope profiles into this folder")
    ap.add_argument("--raw-dir", default="", help="keep py-spy's raw stacks here (default: beside --json)")
    return ap.parse_args(argv)


def py_spy() -> str:
    """Path of the py-spy binary (next to this interpreter, else on PATH).

    Raises:
        SystemExit: py-spy is not installed.
    """
    here = Path(sys.executable).parent / "py-spy"
    found = str(here) if here.is_file() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def record(pid: int, out: Path, args: argparse.Namespace, fmt: str = "raw") -> subprocess.Popen[bytes]:
    return subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--rate", str(args.rate), "--duration",
                             str(int(args.duration_s)), "--format", fmt, "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def entries_read(r: redis.Redis, stream: str) -> int:
    for g in r.xinfo_groups(stream):
        if g.get("name") in (b"workers", "workers"):
            return int(g.get("entries-read") or 0)
    return 0


def redis_cpu_s(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def profile(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model = "affine" if args.fake else "minilm-standin"
    kind = "affine" if args.fake else "text"
    with EmbeddedRedis() as server:
        ns = f"prof-{uuid.uuid4().hex[:6]}"
        extra = [] if args.fake else ["--standin", args.standin]
        with WorkerProcesses(server.url, ns, model, fake=args.fake, module="benchmarks.lib.bench_worker",
                             extra_args=extra, threads=args.threads,
                             settings={"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}) as workers:
            load = subprocess.Popen([sys.executable, "-m", "benchmarks.lib.saturate", server.url, ns, model, kind,
                                     str(args.in_flight), str(args.warmup_s), str(args.duration_s + 2),
                                     str(args.chunk), *(["--arrays", str(args.arrays)] if args.arrays else [])],
                                    stdout=subprocess.PIPE, text=True)
            time.sleep(args.warmup_s + 1.0)  # the load generator's own start-up, then its warm-up
            r = redis.Redis.from_url(server.url)
            stream = ModelKeys(ns, model).requests
            pids = {"worker": workers.pids[0], "client": load.pid}
            files = {who: tmp / f"{who}.txt" for who in pids}
            spies = [record(pid, files[who], args) for who, pid in pids.items()]
            if args.speedscope:
                Path(args.speedscope).mkdir(parents=True, exist_ok=True)
                spies += [record(pid, Path(args.speedscope) / f"{who}.speedscope.json", args, "speedscope")
                          for who, pid in pids.items()]
            python = {who: python_tids(pid) for who, pid in pids.items()}
            r.config_resetstat()  # commandstats of the window only (CPU time is not reset)
            n0, rc0 = entries_read(r, stream), redis_cpu_s(r)
            cpu0 = {who: process_cpu_s(pid) for who, pid in pids.items()}
            threads0 = {who: thread_cpu_s(pid) for who, pid in pids.items()}
            t0 = time.perf_counter()
            for spy in spies:
                _, err = spy.communicate(timeout=args.duration_s + 60)
                if spy.returncode != 0:
                    raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
            wall = time.perf_counter() - t0
            n1, rc1 = entries_read(r, stream), redis_cpu_s(r)
            commands = r.info("commandstats")
            cpu = {who: process_cpu_s(pid) - cpu0[who] for who, pid in pids.items()}
            native = {who: native_cpu_s(threads0[who], thread_cpu_s(pid), python[who]) for who, pid in pids.items()}
            sat = json.loads(load.communicate(timeout=120)[0])
            r.close()
    served = (n1 - n0) * args.chunk  # the endless item stream fills every chunk
    active = {who: stages.us_per_sample(stages.stage_counts(stages.parse_raw(files[who].read_text()),
                                                            stages.WORKER_RULES if who == "worker"
                                                            else stages.CLIENT_RULES), args.rate, served)
              for who in pids}
    proc = {who: v * 1e6 / max(1, served) for who, v in cpu.items()}
    proc["redis"] = (rc1 - rc0) * 1e6 / max(1, served)
    native_us = {who: v * 1e6 / max(1, served) for who, v in native.items()}
    return {"model": model, "simulation": not args.fake, "served": served, "window_s": wall, "chunk": args.chunk,
            "samples_per_s": served / wall, "mean_batch": sat.get("mean_batch"),
            "cpu_us_per_sample": {who: stages.apportion(active[who], proc[who], native_us[who]) for who in pids},
            "active_us_per_sample": active, "proc_cpu_us_per_sample": proc, "load_average": os.getloadavg(),
            "redis_calls_per_entry": calls_per_entry(commands, n1 - n0),
            "redis_us_per_entry": us_per_entry(commands, n1 - n0)}


def us_per_entry(commandstats: dict[str, Any], entries: int) -> dict[str, float]:
    """Redis' own microseconds per request entry by command over the window, largest first
    (a script's or function's time includes the commands it runs, listed too)."""
    us = {name.removeprefix("cmdstat_"): float(row["usec"]) / max(1, entries) for name, row in commandstats.items()}
    return dict(sorted(us.items(), key=lambda kv: -kv[1]))


def python_tids(pid: int) -> set[int]:
    """Native ids of the threads that run Python in ``pid`` (``py-spy dump``); the other
    threads (a tokenizer's rayon pool, BLAS) never show in py-spy's samples."""
    out = subprocess.run([py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60).stdout
    return {int(m) for m in re.findall(r"^Thread (?:0x)?(\d+)", out, flags=re.MULTILINE)}


def native_cpu_s(before: dict[int, float], after: dict[int, float], python: set[int]) -> float:
    """CPU seconds the threads without a Python stack used between two :func:`thread_cpu_s`
    readings (0.0 when the Python threads are unknown: then nothing is set apart)."""
    if not python:
        return 0.0
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items() if tid not in python)


def calls_per_entry(commandstats: dict[str, Any], entries: int) -> dict[str, float]:
    """Redis commands per request entry over the window, most frequent first (commands run
    inside scripts and functions are counted too)."""
    calls = {name.removeprefix("cmdstat_"): float(row["calls"]) / max(1, entries)
             for name, row in commandstats.items()}
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def render(res: dict[str, Any]) -> Table:
    what = "zero-cost fake (affine)" if not res["simulation"] else "accelerator stand-in (SIMULATION)"
    t = Table(title=f"CPU us per sample by stage: {what}, {res['samples_per_s']:.0f} samples/s, mean batch "
                    f"{res['mean_batch']:.0f}, load average {res['load_average'][0]:.1f}")
    t.add_column("process")
    t.add_column("stage")
    t.add_column("CPU us / sample", justify="right")
    t.add_column("active thread us / sample (py-spy)", justify="right")
    for who, order in (("worker", (*stages.WORKER_STAGES, stages.NATIVE, *stages.NOT_CPU)),
                       ("client", (*stages.CLIENT_STAGES, stages.NATIVE, stages.IDLE))):
        cpu, active = res["cpu_us_per_sample"][who], res["active_us_per_sample"][who]
        for stage in order:
            if stage in active or stage in cpu:
                t.add_row(who, stage, f"{cpu[stage]:.1f}" if stage in cpu else "-",
                          f"{active[stage]:.1f}" if stage in active else "-")
        t.add_row(who, "[bold]total[/]", f"[bold]{cpu['total']:.1f}[/]", f"{active['total']:.1f}")
    t.add_row("redis", "INFO CPU", f"{res['proc_cpu_us_per_sample']['redis']:.1f}", "")
    return t


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    raw_dir = Path(args.raw_dir or Path(args.json).parent)
    raw_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headrace-prof-") as tmp:
        res = profile(args, Path(tmp))
        for f in Path(tmp).glob("*.txt"):
            shutil.copy(f, raw_dir / f"profile_{res['model']}_{f.name}")
    Console().print(render(res))
    print("Redis calls per entry: " + ", ".join(f"{k} {v:.2f}" for k, v in res["redis_calls_per_entry"].items()))
    print("Redis us per entry (scripts include their commands): "
          + ", ".join(f"{k} {v:.1f}" for k, v in list(res["redis_us_per_entry"].items())[:12]))
    doc = {"benchmark": "profile_worker", "started_at": started, "host": host_info(), "args": vars(args), **res}
    write_json(args.json, doc)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
