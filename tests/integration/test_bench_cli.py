"""``headrace bench`` for a couple of seconds against a real (fake-affine) worker on a
private Redis: the JSON report, the plot, and the refusal without a worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from benchmarks.lib.systems import live_workers
from headrace.cluster.cli.main import main
from tests.support.client import start_fake_worker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def affine_worker(redis_url: str) -> Iterator[Any]:
    w = start_fake_worker(redis_url, "affine", "affine", namespace="benchns")
    assert wait_until(lambda: bool(live_workers(redis_url, "benchns", "affine")), timeout_s=10)
    yield w
    w.stop()


def bench(redis_url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", "benchns", "bench", *args],
                              env={"COLUMNS": "200"})


def test_closed_and_open_loop_reports(redis_url: str, affine_worker: Any, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = bench(redis_url, "affine", "--concurrency", "1,8", "--duration-s", "1", "--warmup-s", "0.2",
                "--json", str(out), "--plot", str(png), "--no-progress")
    assert res.exit_code == 0, res.output
    assert "headrace bench affine" in res.output
    doc = json.loads(out.read_text())
    assert doc["model"] == "affine" and doc["mode"] == "closed"
    assert doc["payloads"]["kind"] == "tensor" and doc["payloads"]["inputs"]["x"]["shape"] == [4]
    assert len(doc["workers"]) == 1 and "redis_url" not in doc["settings"]
    assert [p["concurrency"] for p in doc["points"]] == [1, 8]
    for p in doc["points"]:
        assert p["errors"] == {}
        assert p["ok"] == p["sent"] > 0
        assert p["throughput_rps"] > 0
        e2e, queue, infer = p["e2e"], p["queue"], p["infer"]
        assert 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"] <= e2e["max"]
        assert queue["n"] == e2e["n"] and infer["n"] == e2e["n"]
        assert infer["p50"] < e2e["p50"]  # inference is part of the end-to-end time
        assert sum(int(k) * v for k, v in p["batches"].items()) == pytest.approx(p["ok"], rel=0.01)
    # One submitter never has batch-mates; eight usually do.
    assert set(doc["points"][0]["batches"]) == {"1"}
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"

    res = bench(redis_url, "affine", "--mode", "open", "--rate", "100", "--duration-s", "1", "--warmup-s", "0.2",
                "--json", "-", "--no-progress", "--seed", "3")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    (p,) = doc["points"]
    assert p["offered_rps"] == 100.0 and p["mode"] == "open"
    assert p["ok"] == p["sent"] > 50
    assert p["extra"]["shed"] == 0 and p["extra"]["late_p50_ms"] is not None


def test_refuses_without_a_live_worker(redis_url: str) -> None:
    res = bench(redis_url, "nobody", "--duration-s", "1", "--no-progress")
    assert res.exit_code == 1
    assert "no live worker serves 'nobody'" in res.output


def test_rejects_an_unbounded_run(redis_url: str) -> None:
    res = bench(redis_url, "affine", "--concurrency", "1,2,3", "--duration-s", "900", "--max-total-s", "60")
    assert res.exit_code == 1
    assert "max_total_s" in res.output


@pytest.mark.timeout(60)
def test_stream_round_trip_floor_measures_and_cleans_up(redis_url: str) -> None:
    import redis

    from benchmarks.lib.floor import stream_round_trip_floor

    before = set(redis.Redis.from_url(redis_url).keys("floor-*"))
    out = stream_round_trip_floor(redis_url, 200.0, duration_s=1.0, warmup_s=0.5, seed=1)
    rt = out["round_trip_ms"]
    assert out["rate_rps"] == 200.0 and out["echo_exit"] == 0 and rt["n"] > 100  # ~200 measured arrivals, all echoed back
    assert 0 < rt["p50"] <= rt["p99"] < 1000
    assert set(redis.Redis.from_url(redis_url).keys("floor-*")) == before
