"""Where a worker's (and its client's) CPU goes, stage by stage, from py-spy samples.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;... N``
(root first, ``N`` samples), each frame ``Qualified.name (path:line)``. :func:`classify`
walks a stack from the leaf towards the root and gives it the stage of the first frame a
rule names: a stack ending in redis-py's socket code under ``RedisBroker.commit`` is
*commit*, one under ``RedisBroker.read`` is *read*. Stacks no rule names are *event loop
/ other* (asyncio, logging, thread start-up).

The rules name functions of the current worker and SDK; when those move, the table here
is what to update (an unmatched function shows up in *other*, so a stale rule is visible).

Units: :func:`us_per_sample` turns sample counts into microseconds of *active thread
time* per served sample: ``count / rate_hz / samples * 1e6``. py-spy counts a thread
whenever it is not idle, which includes waiting for the GIL and waiting for a core on a
busy machine, so these sum to more than the CPU the process used. :func:`apportion`
therefore splits the process' measured CPU time (``/proc``) over the stages in proportion
to their samples: the CPU figures of the tables. The simulated device's sleep is reported
apart (``device wait``), as are threads blocked in ``epoll`` or a queue (``idle wait``):
neither is CPU.
"""

from __future__ import annotations

import linecache
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORKER_STAGES = ("read", "decode", "admission", "tokenise", "batch build", "model call", "encode results", "commit",
                 "housekeeping", "redis-py I/O (unattributed)", "event loop / other")
CLIENT_STAGES = ("submit", "reply read", "map bookkeeping", "redis-py I/O (unattributed)", "event loop / other")
DEVICE_WAIT = "device wait (simulated, not CPU)"
IDLE = "idle wait (epoll, queues; not CPU)"
NOT_CPU = (DEVICE_WAIT, IDLE)
NATIVE = "native threads (no Python stack: tokenizer pool, BLAS)"
# Leaf functions that block in the kernel: py-spy may still report such a thread as active.
IDLE_LEAVES = frozenset({"EpollSelector.select", "PollSelector.select", "SelectSelector.select", "Condition.wait",
                         "Event.wait", "SimpleQueue.get", "Queue.get", "Thread.join", "Lock.acquire"})

# Python lines that block in C (py-spy shows the Python frame as the leaf): the inference
# thread waiting for its next job.
IDLE_LINES: tuple[tuple[str, str], ...] = (("workers/engine/daemon.py", "self._jobs.get()"),)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*):(?P<line>\d+)\)$")


@dataclass(frozen=True)
class Rule:
    """A frame belongs to ``stage`` when its path ends with ``path``, its function (the
    qualified name py-spy prints) is in ``funcs`` (empty: any), and, with ``line_has``, its
    source line contains that text."""

    stage: str
    path: str
    funcs: frozenset[str] = frozenset()
    line_has: str = ""

    def matches(self, func: str, path: str, line: int) -> bool:
        if not path.endswith(self.path):
            return False
        # Nested code (``RedisBroker.commit.<locals>.go``) belongs to the function around it.
        outer = func.split(".<locals>", 1)[0]
        if self.funcs and outer not in self.funcs and outer.rsplit(".", 1)[-1] not in self.funcs:
            return False
        if self.line_has:
            return self.line_has in _source_line(path, line)
        return True


def _r(stage: str, path: str, *funcs: str, line_has: str = "") -> Rule:
    return Rule(stage, path, frozenset(funcs), line_has)


WORKER_RULES: tuple[Rule, ...] = (
    _r(DEVICE_WAIT, "benchmarks/lib/standin.py", "SimulatedDevice.run"),
    _r("model call", "benchmarks/lib/standin.py", "_traceable_rows", "StandInServable.infer",
       "StandInServable.infer_texts"),
    _r("model call", "workers/backends/fake.py"),
    _r("model call", "workers/backends/onnx.py"),
    _r("model call", "workers/backends/torch_backend.py"),
    _r("tokenise", "workers/backends/tokens.py", "TextEncoder.encode", line_has="_tokenise"),
    _r("tokenise", "workers/backends/tokens.py", "TextEncoder._tokenise", "TextEncoder.count",
       "TextEncoder.count_batch"),
    _r("tokenise", "models/tokenizer.py"),
    _r("tokenise", "benchmarks/lib/standin.py", "StandInServable.length", "StandInServable.lengths",
       "StandInServable.text_lengths"),
    _r("encode results", "workers/backends/prepost.py", "split", "postprocess"),
    _r("batch build", "workers/backends/prepost.py"),
    _r("batch build", "workers/backends/tokens.py"),
    _r("encode results", "client/protocol.py", "encode_result", "encode_tensor", "Timings.to_wire", "error_result"),
    _r("decode", "client/protocol.py"),
    _r("decode", "client/samples.py"),
    _r("encode results", "workers/pipeline/group.py"),
    _r("encode results", "workers/pipeline/answers.py"),
    _r("commit", "workers/pipeline/work.py", "Unit.stats_line"),
    _r("commit", "workers/pipeline/stats.py"),
    _r("commit", "workers/pipeline/ops.py"),
    _r("admission", "workers/pipeline/entry.py"),
    _r("admission", "workers/engine/admission.py"),
    _r("admission", "workers/backends/validate.py"),
    _r("admission", "workers/engine/intake.py", "Intake.admit", "Intake._keep", "Intake._prechecks", "Intake._prepare"),
    _r("admission", "workers/broker/redis_broker.py", "RedisBroker.answered"),
    _r("read", "workers/broker/redis_broker.py", "RedisBroker.read", "RedisBroker.read_ready",
       "RedisBroker._sizing_args"),
    _r("read", "workers/broker/replies.py", "stream_entries", "script_entry", "sized", "pairs"),
    _r("read", "workers/engine/intake.py", "Intake.read_loop", "Intake._wait_for_room"),
    _r("commit", "workers/broker/redis_broker.py", "RedisBroker.commit", "RedisBroker._commit_args"),
    _r("commit", "workers/broker/replies.py", "flat_fields"),
    _r("commit", "workers/engine/writer.py"),
    _r("commit", "workers/engine/worker.py", "StreamWorker._after_commit"),
    _r("commit", "workers/metrics.py"),
    _r("encode results", "workers/engine/inference.py", "BatchRunner._answer"),
    _r("batch build", "workers/engine/inference.py"),
    _r("batch build", "workers/engine/calls.py"),
    _r("batch build", "workers/engine/batcher.py"),
    _r("batch build", "workers/engine/worker.py", "StreamWorker._infer_loop", "StreamWorker._record_calls"),
    _r("housekeeping", "workers/broker/redis_broker.py", "RedisBroker.refresh_lease", "RedisBroker.heartbeat",
       "RedisBroker.backlog", "RedisBroker.trim", "RedisBroker.claim_abandoned", "RedisBroker.release",
       "RedisBroker.delete_idle_consumers", "RedisBroker.unregister"),
    _r("housekeeping", "workers/broker/redis_conn.py", "RedisConnection.ensure_group", "RedisConnection.ensure_functions",
       "RedisConnection.ping"),
    _r("housekeeping", "workers/broker/backlog.py"),
    _r("housekeeping", "workers/engine/upkeep.py"),
    _r("housekeeping", "workers/engine/intake.py", "Intake.claim_loop"),
)

# Only for stacks no rule above names. asyncio.wait_for runs redis-py's socket writes in a
# task of their own (Python < 3.12), whose stack no longer shows which command it sends.
FALLBACK_RULES: tuple[Rule, ...] = (
    _r("redis-py I/O (unattributed)", "redis/asyncio/connection.py"),
    _r("redis-py I/O (unattributed)", "redis/connection.py"),
    _r("redis-py I/O (unattributed)", "redis/_parsers/"),
)

CLIENT_RULES: tuple[Rule, ...] = (
    _r("reply read", "client/results.py"),
    _r("reply read", "client/wire.py", "decode_tensor", "unpack_msgpack", "field_text"),
    _r("reply read", "client/core.py", "ClientCore.take_replies", "ClientCore.take_deletes"),
    _r("reply read", "client/flows.py", "read_loop"),
    _r("reply read", "client/async_io.py", "AsyncIO._xread", "AsyncIO._resolve", "AsyncIO._delete"),
    _r("reply read", "client/tickets.py", "ordered_results", "Ticket.result", "Ticket.done", "Ticket._outcome"),
    _r("submit", "client/wire.py"),
    _r("submit", "client/protocol.py"),
    _r("submit", "client/submit.py"),
    _r("submit", "client/samples.py"),
    _r("submit", "client/pipeline.py"),
    _r("submit", "client/chunks.py", "prepare_chunk"),
    _r("submit", "client/core.py"),
    _r("submit", "client/tickets.py"),
    _r("submit", "client/flows.py", "send", "gate"),
    _r("submit", "client/async_io.py", "AsyncIO._send"),
    _r("map bookkeeping", "client/bulk.py"),
    _r("map bookkeeping", "client/chunks.py"),
    _r("map bookkeeping", "client/arrays.py"),
    _r("map bookkeeping", "client/flows.py"),
    _r("map bookkeeping", "client/effects.py"),
    # (not its ``main``: asyncio.run under it is the root of every stack of the process)
    _r("map bookkeeping", "benchmarks/lib/saturate.py", "saturate", "_saturate_arrays", "items"),
)


def _source_line(path: str, line: int) -> str:
    for base in (ROOT, ROOT / "src" / "headrace"):
        p = base / path
        if p.is_file():
            return linecache.getline(str(p), line)
    return ""


def parse_frame(frame: str) -> tuple[str, str, int]:
    """``(function, path, line)`` of one py-spy frame (``("frame", "", 0)`` when it has no location)."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), "", 0
    return m["func"], m["path"], int(m["line"])


def classify(stack: Sequence[str], rules: Sequence[Rule]) -> str:
    """The stage of a stack (root first): :data:`IDLE` when its leaf blocks in the kernel;
    else the first of ``rules`` matching a frame, leaf first; else the same with
    :data:`FALLBACK_RULES`; else ``event loop / other``."""
    frames = [parse_frame(f) for f in reversed(stack)]
    if frames and frames[0][0] in IDLE_LEAVES:
        return IDLE
    if frames and frames[0][1] and any(frames[0][1].endswith(p) and text in _source_line(frames[0][1], frames[0][2])
                                       for p, text in IDLE_LINES):
        return IDLE
    for tier in (rules, FALLBACK_RULES):
        for func, path, line in frames:
            if not path:
                continue
            for rule in tier:
                if rule.matches(func, path, line):
                    return rule.stage
    return "event loop / other"


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """``(stack, samples)`` pairs of py-spy's raw (collapsed) output; a leading
    ``thread (...)`` or ``process ...`` pseudo-frame is dropped."""
    out: list[tuple[list[str], int]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack_text.split(";")
        while frames and (frames[0].startswith("thread (") or frames[0].startswith("process ")):
            frames = frames[1:]
        out.append((frames, int(count)))
    return out


def stage_counts(stacks: Iterable[tuple[list[str], int]], rules: Sequence[Rule]) -> Counter[str]:
    """Samples per stage."""
    counts: Counter[str] = Counter()
    for stack, n in stacks:
        counts[classify(stack, rules)] += n
    return counts


def us_per_sample(counts: Mapping[str, int], rate_hz: float, samples: int) -> dict[str, float]:
    """CPU microseconds per served sample for each stage (see module doc), plus ``total``
    (device wait left out of the total)."""
    n = max(1, samples)
    out = {stage: c / rate_hz / n * 1e6 for stage, c in counts.items()}
    out["total"] = sum(v for k, v in out.items() if k not in NOT_CPU)
    return out


def apportion(active_us: Mapping[str, float], cpu_us: float, native_us: float = 0.0) -> dict[str, float]:
    """Split ``cpu_us`` (the process' measured CPU per sample) over the stages of
    ``active_us`` (from :func:`us_per_sample`) in proportion to their active time; the
    device wait and ``total`` are left out, and ``total`` becomes ``cpu_us``.

    ``native_us``: the part of ``cpu_us`` spent by threads without a Python stack (a
    tokenizer's rayon pool, BLAS threads), which py-spy never samples: it is its own
    :data:`NATIVE` stage instead of being spread over the Python stages."""
    stages = {k: v for k, v in active_us.items() if k not in (*NOT_CPU, "total")}
    whole = sum(stages.values())
    python_us = max(0.0, cpu_us - native_us)
    out = {k: (v / whole * python_us if whole > 0 else 0.0) for k, v in stages.items()}
    if native_us > 0:
        out[NATIVE] = native_us
    out["total"] = cpu_us
    return out
