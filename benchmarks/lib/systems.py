"""Start and stop the headrace systems a benchmark measures: standalone worker processes,
and thread pinning shared by every system of a comparison.

Thread pinning: the same number of backend threads everywhere (ONNX Runtime
``intra_op_num_threads`` through :class:`WorkerSettings`, torch and the OpenMP/MKL pools
through the environment), so a comparison measures the data plane, not thread counts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import redis

from headrace.client import errors as E
from headrace.client.registry import read_model

log = logging.getLogger(__name__)


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins the math libraries of a (child) process to ``threads``, the
    tokenizer's ``encode_batch`` pool (rayon) included."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "RAYON_NUM_THREADS": n,
            "HEADRACE_INTRA_OP_THREADS": n}


def set_ort_spin(on: bool) -> None:
    """ONNX Runtime spin-wait for every compared system alike: this process reads it through
    ``WorkerSettings.from_env`` and worker processes / Ray replicas inherit the variable."""
    import os

    os.environ["HEADRACE_ORT_SPIN"] = "1" if on else "0"


def pin_threads(threads: int) -> None:
    """Pin this process: the env of :func:`thread_env` (for libraries loaded later) and
    torch's intra-op pool when torch is already imported."""
    os.environ.update(thread_env(threads))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _stat_cpu_s(path: str) -> float:
    """User + system CPU seconds of a ``/proc/.../stat`` file; 0.0 when it cannot be read."""
    try:
        with open(path, encoding="ascii") as fh:
            # The command name (field 2) may hold spaces; the numbers follow the last ')'.
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0.0 when it is
    gone or ``/proc`` is not available (not Linux)."""
    return _stat_cpu_s(f"/proc/{pid}/stat")


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each live thread of a process has used so far, by native
    thread id; empty when the process is gone or ``/proc`` is not available."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    return {int(t): _stat_cpu_s(f"/proc/{pid}/task/{t}/stat") for t in tids if t.isdigit()}


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (children, grandchildren...), from ``/proc``;
    ``[root]`` where ``/proc`` is not available."""
    parents: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return [root]
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


class CpuMeter:
    """CPU seconds spent by this process (the load generator) and by all its descendants
    (worker processes, Redis, a local Ray cluster and its replicas) between ``start`` and
    ``stop``. Unlike wall-clock throughput, CPU per request hardly moves when other tenants
    of the machine take cores away, so it is the steadier measure on a shared machine.
    Processes that start and end inside the interval are missed."""

    def __init__(self) -> None:
        self.me = os.getpid()
        self._before: dict[int, float] = {}
        self.driver_s = 0.0
        self.others_s = 0.0

    def _snap(self) -> dict[int, float]:
        return {pid: process_cpu_s(pid) for pid in descendants(self.me)}

    def start(self) -> CpuMeter:
        self._before = self._snap()
        return self

    def stop(self) -> CpuMeter:
        after = self._snap()
        delta = {pid: v - self._before.get(pid, 0.0) for pid, v in after.items()}
        self.driver_s = delta.pop(self.me, 0.0)
        self.others_s = sum(v for v in delta.values() if v > 0)
        return self

    def per_request_us(self, n: int) -> dict[str, float]:
        """``{"load_generator", "system", "total"}`` in CPU microseconds per request."""
        n = max(1, n)
        return {"load_generator": self.driver_s * 1e6 / n, "system": self.others_s * 1e6 / n,
                "total": (self.driver_s + self.others_s) * 1e6 / n}


def live_workers(redis_url: str, namespace: str, model: str) -> list[str]:
    """Names of the workers whose registry heartbeat for ``model`` is recent.

    Raises:
        BrokerError: Redis is unreachable.
    """
    r = redis.Redis.from_url(redis_url)
    try:
        record, now_ms = read_model(r, namespace, model)
    finally:
        r.close()
    return [w.consumer for w in record.live_workers(now_ms)] if record else []


def wait_for_workers(redis_url: str, namespace: str, model: str, n: int, timeout_s: float = 180.0,
                     alive: Any = None) -> list[str]:
    """Wait until ``n`` workers registered ``model``; ``alive()`` (optional) returning False
    aborts early (a worker process that died while loading).

    Raises:
        BrokerError: not ``n`` workers within ``timeout_s``, or ``alive()`` turned False.
    """
    give_up = time.monotonic() + timeout_s
    while True:
        names = live_workers(redis_url, namespace, model)
        if len(names) >= n:
            return names
        if alive is not None and not alive():
            raise E.BrokerError(f"a worker for {model!r} exited while starting")
        if time.monotonic() > give_up:
            raise E.BrokerError(f"{len(names)} of {n} workers for {model!r} registered within {timeout_s:.0f}s")
        time.sleep(0.2)


class WorkerProcesses:
    """``n`` standalone workers (``python -m headrace.workers``) as child processes.

    Args:
        redis_url / namespace / model / version / model_repo: what to serve, from where.
        n: processes to start.
        threads: backend threads per process.
        fake: serve the ``affine``/``length`` numpy fake instead of a repository model.
        settings: further ``WorkerSettings`` fields as ``--flag`` values (``max_batch``...).
        env: extra environment (e.g. ``HEADRACE_FAKE_DELAY_MS``).
        log_path: append the workers' stderr here (default: discarded).
        module: the worker module to run (``benchmarks.lib.probe`` for probes,
            ``benchmarks.lib.bench_worker`` for the accelerator stand-in).
        extra_args: more command-line arguments for ``module`` (``--standin cuda fp16``).

    Use as a context manager; on exit the workers get SIGTERM (graceful drain) and are
    killed if they do not exit within ``stop_timeout_s``.
    """

    def __init__(self, redis_url: str, namespace: str, model: str, *, version: str = "", model_repo: str = "",
                 n: int = 1, threads: int = 1, fake: str = "", settings: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, log_path: str | None = None,
                 start_timeout_s: float = 180.0, stop_timeout_s: float = 30.0,
                 module: str = "headrace.workers", extra_args: Sequence[str] = ()) -> None:
        self.redis_url, self.namespace, self.model, self.n = redis_url, namespace, model, n
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        args = [sys.executable, "-m", module, "--model", model, "--redis-url", redis_url,
                "--namespace", namespace, "--log-level", "WARNING"]
        if fake:
            args += ["--fake", fake]
        if version:
            args += ["--version", version]
        if model_repo:
            args += ["--model-repo", model_repo]
        for k, v in (settings or {}).items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.args = [*args, *extra_args]
        self.env = {**os.environ, **thread_env(threads), **(env or {})}
        self.log_path = log_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> WorkerProcesses:
        """Start the processes and wait until all registered.

        Raises:
            BrokerError: they did not all come up within ``start_timeout_s``.
        """
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen(self.args, env=self.env, stdout=out, stderr=out,
                                                   start_new_session=True))
        finally:
            if self.log_path:
                out.close()
        try:
            wait_for_workers(self.redis_url, self.namespace, self.model, self.n, self.start_timeout_s,
                             alive=lambda: all(p.poll() is None for p in self.procs))
        except E.BrokerError:
            self.stop()
            raise
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        """SIGTERM (drain), then SIGKILL after ``stop_timeout_s``. Idempotent."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        give_up = time.monotonic() + self.stop_timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not drain within %.0fs; killing it", p.pid, self.stop_timeout_s)
                p.kill()
                p.wait(10)
        self.procs = []

    def __enter__(self) -> WorkerProcesses:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
