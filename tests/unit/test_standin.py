"""The accelerator stand-in of the benchmarks: its curve, its device and its servable."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.lib.standin import (
    DEFAULT_CURVE_FILE,
    EMBEDDING_DIM,
    LatencyCurve,
    SimulatedDevice,
    StandInServable,
)
from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request

pytestmark = pytest.mark.timeout(60)


def test_curve_points_are_batch_over_throughput() -> None:
    c = LatencyCurve.from_throughput({"8": 1000.0, "1": 250.0, "32": 3200.0})
    assert c.batches == (1, 8, 32)
    assert c.latency(1) == pytest.approx(0.004)
    assert c.latency(8) == pytest.approx(0.008)
    assert c.latency(32) == pytest.approx(0.010)
    assert c.throughput(32) == pytest.approx(3200.0)


def test_curve_interpolates_latency_linearly_between_points() -> None:
    c = LatencyCurve((1, 8, 32), (0.004, 0.008, 0.010))
    # halfway in batch size between 8 and 32 -> halfway in latency
    assert c.latency(20) == pytest.approx(0.009)
    assert c.latency(2) == pytest.approx(0.004 + 0.004 / 7)
    lat = [c.latency(b) for b in range(1, 33)]
    assert all(a <= b for a, b in zip(lat, lat[1:], strict=False))


def test_curve_outside_the_measured_sizes() -> None:
    c = LatencyCurve((4, 16), (0.002, 0.004))
    # below the smallest: its latency (never quicker than one launch)
    assert c.latency(1) == pytest.approx(0.002)
    # above the largest: its throughput is kept (time grows with the batch)
    assert c.latency(64) == pytest.approx(0.016)
    assert c.throughput(64) == pytest.approx(c.throughput(16))


@pytest.mark.parametrize("batches, lat", [((), ()), ((0, 4), (0.1, 0.2)), ((8, 4), (0.1, 0.2)),
                                          ((1, 2), (0.1, 0.0))])
def test_curve_rejects_bad_points(batches: tuple[int, ...], lat: tuple[float, ...]) -> None:
    with pytest.raises(E.ConfigError):
        LatencyCurve(batches, lat)


def test_curve_rejects_bad_batch_and_bad_file(tmp_path: Path) -> None:
    c = LatencyCurve((1,), (0.001,))
    with pytest.raises(E.ConfigError, match=">= 1"):
        c.latency(0)
    with pytest.raises(E.ConfigError, match="cannot read"):
        LatencyCurve.load(tmp_path / "missing.json")
    (tmp_path / "r.json").write_text(json.dumps({"runs": {"cuda fp32": {"throughput": {"1": 10}}}}))
    with pytest.raises(E.ConfigError, match="no run 'cuda fp16'"):
        LatencyCurve.load(tmp_path / "r.json", "cuda fp16")
    (tmp_path / "z.json").write_text(json.dumps({"runs": {"x": {"throughput": {"1": 0}}}}))
    with pytest.raises(E.ConfigError, match="> 0"):
        LatencyCurve.load(tmp_path / "z.json", "x")


def test_the_packaged_h100_curve_loads() -> None:
    doc = json.loads(DEFAULT_CURVE_FILE.read_text())
    c = LatencyCurve.load()
    for b, tput in doc["runs"]["cuda fp16"]["throughput"].items():
        assert c.throughput(int(b)) == pytest.approx(tput)
    assert "H100" in c.label


def test_device_call_takes_the_curve_latency() -> None:
    dev = SimulatedDevice(LatencyCurve((1, 10), (0.02, 0.05)))
    ran = dev.run(10)
    assert ran >= 0.05
    assert dev.calls == 1 and dev.samples == 10 and dev.busy_s == pytest.approx(ran)


def test_device_runs_one_call_at_a_time() -> None:
    dev = SimulatedDevice(LatencyCurve((1,), (0.05,)))
    spans: list[tuple[float, float]] = []

    def call() -> None:
        t0 = time.perf_counter()
        dev.run(1)
        spans.append((t0, time.perf_counter()))

    threads = [threading.Thread(target=call) for _ in range(3)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # three calls of 50 ms on one device cannot finish in less than 150 ms
    assert time.perf_counter() - t0 >= 0.15
    assert dev.calls == 3 and dev.busy_s >= 0.15


def test_device_releases_the_gil_while_it_runs() -> None:
    """Another thread of the process makes progress during a call (a held GIL would
    stall it until the call returns)."""
    dev = SimulatedDevice(LatencyCurve((1,), (1.0,)))
    call_done = threading.Event()
    caller = threading.Thread(target=lambda: (dev.run(1), call_done.set()))
    caller.start()
    while dev.calls == 0 and not dev._lock.locked():  # noqa: SLF001 - wait until the call holds the device
        time.sleep(0.001)
    steps = 0
    while not call_done.is_set() and steps < 200_000:
        steps += 1  # pure Python: needs the GIL for every step
    finished_during_call = not call_done.is_set()
    caller.join()
    assert finished_during_call, f"the device call held the GIL: {steps} Python steps could not run beside it"


def test_standin_servable_tokenises_for_real_and_answers_384_d() -> None:
    c = LatencyCurve((1, 64), (0.001, 0.002))
    s = StandInServable(c, max_batch=4)
    texts = ["the quick brown fox", "a", "jumps over the lazy dog " * 3, "", "unicode: żółw", "x y z"]
    reqs = [Request(Envelope(f"r{i}", "reply"), text=t) for i, t in enumerate(texts)]
    lengths = [s.length(r) for r in reqs]
    assert lengths[1] == 3 and lengths[3] == 2  # [CLS] a [SEP]; [CLS] [SEP]
    assert lengths[2] > lengths[0] > lengths[1]
    outs = s.infer(reqs)
    assert len(outs) == len(reqs)
    for o in outs:
        emb = o["embeddings"]
        assert emb.shape == (EMBEDDING_DIM,) and emb.dtype == np.float32
        assert float(np.linalg.norm(emb)) == pytest.approx(1.0)
    # different texts map to different rows (the hot index follows the token ids)
    assert len({int(o["embeddings"].argmax()) for o in outs}) > 1
    assert s.device.calls == 2 and s.device.samples == len(reqs)  # max_batch 4: chunks of 4 and 2
    assert "SIMULATION" in s.describe()["simulation"]


def test_standin_servable_refuses_tensor_requests() -> None:
    s = StandInServable(LatencyCurve((1,), (0.001,)))
    with pytest.raises(E.ProtocolError):
        s.check(Request(Envelope("r", "reply"), inputs={"x": np.zeros(3, np.float32)}))
