"""The data-plane benchmark harness: py-spy stage attribution, the bare ceiling's payloads,
the markdown of benchmarks/dataplane.py."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.lib import stages
from benchmarks.lib.ceiling import request_pool, result_fields
from benchmarks.lib.dataplane_report import PHASE2, markdown
from headrace.client.protocol import decode_request, decode_result

pytestmark = pytest.mark.timeout(60)

LOOP = "BaseEventLoop._run_once (asyncio/base_events.py:1922);Handle._run (asyncio/events.py:80)"


def _stack(*frames: str) -> list[str]:
    return [*LOOP.split(";"), *frames]


def test_classify_walks_from_the_leaf_to_the_first_named_frame() -> None:
    commit = _stack("StreamWorker._write_loop (workers/engine/worker.py:400)",
                    "RedisBroker._call (workers/broker/redis_broker.py:240)",
                    "RedisBroker.commit.<locals>.go (workers/broker/redis_broker.py:380)",
                    "Pipeline.execute (redis/asyncio/client.py:1500)",
                    "AbstractConnection.pack_commands (redis/asyncio/connection.py:900)")
    assert stages.classify(commit, stages.WORKER_RULES) == "commit"
    decode = _stack("StreamWorker._admit (workers/engine/worker.py:220)",
                    "decode_envelope (client/protocol.py:280)", "_s (client/protocol.py:160)")
    assert stages.classify(decode, stages.WORKER_RULES) == "decode"
    admit = _stack("StreamWorker._admit (workers/engine/worker.py:220)",
                   "RedisBroker.answered (workers/broker/redis_broker.py:330)",
                   "Pipeline.execute (redis/asyncio/client.py:1500)")
    assert stages.classify(admit, stages.WORKER_RULES) == "admission"
    tokenise = _stack("StreamWorker._admit (workers/engine/worker.py:220)",
                      "Admission.length (workers/engine/admission.py:200)",
                      "StandInServable.length (benchmarks/lib/standin.py:240)",
                      "TextEncoder.count (workers/backends/tokens.py:90)")
    assert stages.classify(tokenise, stages.WORKER_RULES) == "tokenise"


def test_classify_idle_device_and_unattributed_io() -> None:
    assert stages.classify(["BaseEventLoop._run_once (asyncio/base_events.py:1900)",
                            "EpollSelector.select (selectors.py:468)"], stages.WORKER_RULES) == stages.IDLE
    device = ["InferenceThread._main (workers/engine/inference.py:54)",
              "StandInServable.infer (benchmarks/lib/standin.py:262)",
              "SimulatedDevice.run (benchmarks/lib/standin.py:201)"]
    assert stages.classify(device, stages.WORKER_RULES) == stages.DEVICE_WAIT
    # a redis-py write in a task of its own (asyncio.wait_for): no headrace frame names it
    io = _stack("AbstractConnection._send_packed_command (redis/asyncio/connection.py:1168)",
                "StreamWriter.writelines (asyncio/streams.py:346)")
    assert stages.classify(io, stages.WORKER_RULES) == "redis-py I/O (unattributed)"
    assert stages.classify(_stack(), stages.WORKER_RULES) == "event loop / other"


def test_client_rules_split_submit_and_reply_read() -> None:
    submit = _stack("_run_window (client/flows.py:260)", "MapWindow.to_send (client/bulk.py:123)",
                    "_run_window.<locals>.prepare (client/flows.py:242)", "ClientCore.new_ticket (client/core.py:140)",
                    "encode_request (client/protocol.py:125)", "encode_tensor (client/wire.py:106)")
    assert stages.classify(submit, stages.CLIENT_RULES) == "submit"
    read = _stack("adrive (client/effects.py:160)", "read_loop (client/flows.py:330)",
                  "ClientCore.take_replies (client/core.py:285)", "decode_result (client/results.py:190)",
                  "decode_tensor (client/wire.py:150)")
    assert stages.classify(read, stages.CLIENT_RULES) == "reply read"
    window = _stack("_run_window (client/flows.py:270)", "MapWindow.popleft (client/bulk.py:204)")
    assert stages.classify(window, stages.CLIENT_RULES) == "map bookkeeping"


def test_the_inference_thread_waiting_for_a_job_is_idle() -> None:
    import inspect

    from headrace.workers.engine import daemon

    lines, first = inspect.getsourcelines(daemon.DaemonExecutor._main)
    at = first + next(i for i, text in enumerate(lines) if "self._jobs.get()" in text)
    waiting = ["Thread._bootstrap (threading.py:1002)", f"DaemonExecutor._main (workers/engine/daemon.py:{at})"]
    assert stages.classify(waiting, stages.WORKER_RULES) == stages.IDLE
    running = ["Thread._bootstrap (threading.py:1002)", f"DaemonExecutor._main (workers/engine/daemon.py:{at + 5})"]
    assert stages.classify(running, stages.WORKER_RULES) != stages.IDLE


def test_raw_output_to_us_per_sample_and_apportioned_cpu() -> None:
    raw = "\n".join([
        "thread (0x1): MainThread;" + ";".join(_stack("decode_body (client/protocol.py:300)")) + " 30",
        ";".join(["InferenceThread._main (workers/engine/inference.py:54)",
                  "SimulatedDevice.run (benchmarks/lib/standin.py:201)"]) + " 50",
        ";".join(_stack("RedisBroker.read (workers/broker/redis_broker.py:260)")) + " 10",
        "garbage line without a count", ""])
    parsed = stages.parse_raw(raw)
    assert [n for _, n in parsed] == [30, 50, 10]
    assert not parsed[0][0][0].startswith("thread")
    counts = stages.stage_counts(parsed, stages.WORKER_RULES)
    assert counts == {"decode": 30, stages.DEVICE_WAIT: 50, "read": 10}
    active = stages.us_per_sample(counts, rate_hz=100.0, samples=1000)
    assert active["decode"] == pytest.approx(300.0)  # 30 samples / 100 Hz / 1000 samples = 300 us
    assert active["total"] == pytest.approx(400.0)  # the device wait is not CPU
    cpu = stages.apportion(active, 80.0)
    assert cpu == pytest.approx({"decode": 60.0, "read": 20.0, "total": 80.0})


def test_ceiling_payloads_are_headrace_wire_bytes() -> None:
    single = request_pool(1, "ns:{affine}:reply:c", n=3)
    req = decode_request(single[0])
    assert req.inputs["x"].shape == (4,) and req.envelope.reply_to == "ns:{affine}:reply:c"
    assert len({e[b"id"] for e in single}) == 3
    multi = decode_request(request_pool(16, "r", n=1)[0])
    assert multi.inputs["x"].shape == (16, 4)
    y = np.arange(8, dtype=np.float32).reshape(2, 4)
    res = decode_result(result_fields(b"req-1", y))
    assert res.ok and res.request_id == "req-1"
    np.testing.assert_array_equal(res.outputs["y"], y)


def test_dataplane_markdown_marks_phase_two_parts() -> None:
    cpu = {"producer": 1.0, "consumer": 2.0, "reader": 1.0, "redis": 1.0}
    bare = {"samples_per_s": 20000.0, "samples_per_entry": 1, "cpu_us_per_sample": cpu, "load_average": 1.0}
    doc = {"started_at": "t", "host": {"cpus": 2}, "args": {"threads": 2, "max_batch": 256, "duration_s": 8.0,
                                                           "warmup_s": 2.0, "in_flight": 1024},
           "results": {"a": {"bare_single": bare, "bare_multi": {**bare, "samples_per_entry": 64},
                             "headrace_single": {"samples_per_s": 12000.0, "mean_batch": 200.0, "load_average": 1.5,
                                                 "cpu_us_per_sample": {"worker": 50.0}},
                             "ratio_single": 0.6}}}
    md = markdown(doc)
    assert "| 1 | 20 000 | 12 000 | 60 % | >= 60 % |" in md
    assert f"| 64 | 20 000 | {PHASE2} |" in md
    assert "GPU rows" in md and "not measured" in md


def test_native_thread_cpu_is_its_own_stage_not_spread_over_python_stages() -> None:
    """A tokenizer's rayon threads have no Python stack: py-spy never samples them, so
    their CPU (read per thread from /proc) is set apart before the rest is apportioned."""
    import os
    import threading

    from benchmarks.lib.systems import thread_cpu_s
    from benchmarks.profile_worker import native_cpu_s

    active = {"read": 1.0, "commit": 3.0, stages.IDLE: 5.0, "total": 4.0}
    cpu = stages.apportion(active, 10.0, native_us=6.0)
    assert cpu == {"read": 1.0, "commit": 3.0, stages.NATIVE: 6.0, "total": 10.0}
    assert stages.NATIVE not in stages.apportion(active, 10.0)

    before, after = {1: 1.0, 2: 5.0}, {1: 2.0, 2: 8.0, 3: 1.5}  # thread 3 started in the window
    assert native_cpu_s(before, after, python={1}) == pytest.approx(4.5)
    assert native_cpu_s(before, after, python=set()) == 0.0, "unknown Python threads: nothing set apart"

    mine = thread_cpu_s(os.getpid())
    assert threading.get_native_id() in mine and all(v >= 0.0 for v in mine.values())
    assert thread_cpu_s(2**22 + 12345) == {}  # no such process


def _c_result(answered: float) -> dict[str, object]:
    lat = {"p50": 1.0, "p99": 3.0}
    return {"rate_sps": 1000.0, "rate_basis": "single-request capacity",
            "bases_sps": {"smaller limit": 18000.0, "headrace (b) throughput": 9000.0,
                          "single-request capacity": 2000.0},
            "queue_split": {"joined": 10, "queue": lat, "wire_in": lat, "deliver": lat},
            "floor": {"round_trip_ms": {"p50": 0.8, "p99": 4.0}},
            "e2e": {"throughput_rps": answered, "errors": {"shed": 3} if answered < 900 else {}, "e2e": lat,
                    "extra": {"late_p50_ms": 0.3, "late_p99_ms": 2.5, "shed": 0, "gc_collections": 40,
                              "gc_full": 1, "gc_total_ms": 12.0, "gc_max_ms": 4.25}},
            "reference": {"e2e": lat}, "load_average": 1.0}


def test_dataplane_c_names_its_basis_and_flags_an_overloaded_run() -> None:
    """(c)'s half load is half of the least capacity, the single-request one included; a run
    that answers fewer than it was offered is marked overloaded, not read as overhead."""
    from benchmarks.lib.dataplane_report import section_c

    ok = section_c(_c_result(1000.0))
    assert ok.rows[0][0] == "1 000 (single-request capacity)"
    assert ok.rows[0][1].startswith("1 000 (100%)")
    assert ok.rows[0][4] == "p50 met, p99 met"
    assert any("single-request capacity 2 000/s" in n for n in ok.notes)
    assert not any("OVERLOADED" in n for n in ok.notes)
    assert any("late p50 / p99 0.30 / 2.50 ms" in n and "40 (1 full), longest 4.2 ms" in n for n in ok.notes)
    over = section_c(_c_result(600.0))
    assert "shed 3" in over.rows[0][1]
    assert any("OVERLOADED" in n for n in over.notes)


def test_the_stage_tracer_wraps_methods_the_worker_has() -> None:
    """``benchmarks.lib.stage_trace`` wraps worker methods by name: a rename must fail here,
    not leave the idle-path benchmark without its stages."""
    from headrace.workers.broker.redis_broker import RedisBroker
    from headrace.workers.engine.batcher import Batcher
    from headrace.workers.engine.inference import BatchRunner
    from headrace.workers.engine.intake import Intake

    for cls, name in ((RedisBroker, "read"), (RedisBroker, "commit"), (Intake, "_prechecks"), (Batcher, "put"),
                      (Batcher, "next_batch"), (BatchRunner, "_in_thread")):
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"


def test_idle_path_takes_the_first_note_of_each_edge_inside_a_request() -> None:
    from benchmarks.idle_path import _edges

    notes = [["read", "<", 0.5], ["read", "<", 1.2], ["commit", ">", 1.4], ["commit", ">", 1.6], ["read", "<", 3.0]]
    got = _edges(notes, 1.0, 1.1, 2.0)
    assert got == {"sent": 1.0, "submitted": 1.1, "received": 2.0, "read<": 1.2, "commit>": 1.4}
