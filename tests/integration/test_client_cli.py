"""The headrace CLI against a real private Redis with in-process fake workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from headrace.client import Client
from headrace.cluster.cli.main import main
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs, start_fake_worker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workers(redis_url: str) -> Iterator[None]:
    ws = [start_fake_worker(redis_url, "affine", "affine"), start_fake_worker(redis_url, "length", "length")]
    yield
    for w in ws:
        w.stop()


def invoke(redis_url: str, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["--redis-url", redis_url, *args], env={"COLUMNS": "200"})
    return res.exit_code, res.output


def test_submit_npy_json_and_text(redis_url: str, workers: None, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([1, 2, 3, 4], np.float32))
    code, out = invoke(redis_url, "submit", "affine", "--input", str(tmp_path / "x.npy"), "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["status"] == "ok" and doc["outputs"]["y"]["data"] == [3.0, 5.0, 7.0, 9.0]
    assert doc["timings"]["batch_size"] >= 1

    (tmp_path / "in.json").write_text(json.dumps({"x": [0, 0.5, 1, 1.5]}))
    code, out = invoke(redis_url, "submit", "affine", "--input", str(tmp_path / "in.json"))
    assert code == 0, out
    assert "request" in out and "y" in out and "float32" in out and "queue" in out

    code, out = invoke(redis_url, "submit", "length", "--text", "hello", "--json")
    assert code == 0 and json.loads(out)["outputs"]["length"]["data"] == [5]


def test_submit_many_samples_in_chunks(redis_url: str, workers: None, tmp_path: Path) -> None:
    xs = np.arange(40, dtype=np.float32).reshape(10, 4)
    xs[6, 0] = np.nan  # refused in its own slot
    np.save(tmp_path / "xs.npy", xs)
    code, out = invoke(redis_url, "submit", "affine", "--input", f"x={tmp_path / 'xs.npy'}", "--batch",
                       "--chunk-size", "4", "--json")
    docs = [json.loads(line) for line in out.splitlines()]
    assert code == 2 and len(docs) == 10  # one sample failed: exit 2, every sample printed
    assert len({d["request_id"] for d in docs}) == 3  # 4 + 4 + 2 samples per entry
    assert docs[6]["code"] == "bad_value"
    for i, d in enumerate(docs):
        if i != 6:
            assert d["status"] == "ok" and d["outputs"]["y"]["data"] == (xs[i] * 2 + 1).tolist(), (i, d)
    (tmp_path / "t.txt").write_text("a\nbb\nccc\n")
    code, out = invoke(redis_url, "submit", "length", "--texts", str(tmp_path / "t.txt"))
    assert code == 0 and out.count("sample ") == 3, out
    code, out = invoke(redis_url, "submit", "affine", "--text", "x", "--batch")
    assert code == 2 and "--batch applies to --input" in out


def test_submit_batch_to_an_npz_through_the_array_path(redis_url: str, workers: None, tmp_path: Path) -> None:
    xs = np.random.default_rng(3).standard_normal((300, 4)).astype(np.float32)
    np.save(tmp_path / "xs.npy", xs)
    out_file = tmp_path / "out.npz"
    code, out = invoke(redis_url, "submit", "affine", "--input", f"x={tmp_path / 'xs.npy'}", "--batch",
                       "--chunk-size", "64", "--output", str(out_file))
    assert code == 0, out
    assert "300 samples, 300 ok, 0 failed" in out and "y float32[300, 4]" in out
    with np.load(out_file) as saved:
        assert saved["ok"].all()
        np.testing.assert_array_equal(saved["y"], affine_reference(xs))
    xs[123, 1] = np.inf
    np.save(tmp_path / "xs.npy", xs)
    code, out = invoke(redis_url, "submit", "affine", "--input", f"x={tmp_path / 'xs.npy'}", "--batch",
                       "--output", str(out_file))
    assert code == 2 and "299 ok, 1 failed" in out and "sample 123: error bad_value" in out
    with np.load(out_file) as saved:  # written before exiting 2
        assert saved["ok"].sum() == 299 and not saved["ok"][123]
    code, out = invoke(redis_url, "submit", "affine", "--input", f"x={tmp_path / 'xs.npy'}",
                       "--output", str(out_file))
    assert code == 2 and "add one of them" in out
    (tmp_path / "t.txt").write_text("a\nbb\nccc\n")
    code, out = invoke(redis_url, "submit", "length", "--texts", str(tmp_path / "t.txt"), "--output", str(out_file))
    assert code == 0 and "3 samples, 3 ok" in out, out
    with np.load(out_file) as saved:
        assert saved["length"][:, 0].tolist() == [1, 2, 3] and saved["ok"].all()
    # Row i answers line i: a blank line is an empty text, not dropped; "\r\n" ends a line,
    # a "\u2028" inside one does not.
    (tmp_path / "t.txt").write_bytes("a\n\nccc\r\nd\u2028e\n".encode())
    code, out = invoke(redis_url, "submit", "length", "--texts", str(tmp_path / "t.txt"), "--output", str(out_file))
    assert code == 0 and "4 samples, 4 ok" in out, out
    with np.load(out_file) as saved:
        assert saved["length"][:, 0].tolist() == [1, 0, 3, 3]


def test_submit_error_result_exits_2(redis_url: str, workers: None, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones(3, np.float32))
    code, out = invoke(redis_url, "submit", "affine", "--input", str(tmp_path / "x.npy"))
    assert code == 2 and "bad_shape" in out


def test_status_shows_served_and_unserved_models(redis_url: str, workers: None) -> None:
    with Client(redis_url, require_registered=False) as c:
        for i in range(5):
            c.infer("affine", affine_inputs(i))
        c.submit("nobody", affine_inputs(0))  # queued for a model without workers
    r = redis.Redis.from_url(redis_url)
    assert wait_until(lambda: r.xlen("headrace:{affine}:stats") > 0)
    code, out = invoke(redis_url, "status")
    assert code == 0, out
    rows = {cells[0]: cells for cells in (line.split() for line in out.splitlines()) if len(cells) == 10}
    assert {"affine", "length", "nobody"} <= set(rows)
    assert rows["affine"][-1] != "-" and float(rows["affine"][-1]) >= 0  # p99 from the stats stream
    assert rows["nobody"][:3] == ["nobody", "0", "1"]  # nothing in the stream, lag 1: waiting in the inbox


def test_dlq_list_empty_and_purge(redis_url: str) -> None:
    code, out = invoke(redis_url, "dlq", "list", "affine")
    assert code == 0 and "(empty)" in out
    code, out = invoke(redis_url, "dlq", "purge", "affine", "--yes")
    assert code == 0 and "purged 0" in out


def test_unreachable_redis_is_a_clean_error() -> None:
    code, out = invoke("redis://127.0.0.1:1/0", "submit", "affine", "--text", "x", "--timeout-s", "1")
    assert code == 1 and "Error: [broker_error]" in out and "Traceback" not in out


def test_worker_and_redis_commands_as_processes(tmp_path: Path) -> None:
    """`headrace redis` prints a URL; `headrace worker --fake affine` serves it; SIGTERM drains."""
    exe = str(Path(sys.executable).with_name("headrace"))
    env = {**os.environ, "HEADRACE_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([exe, "redis", "--data-dir", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    worker = None
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith("redis://127.0.0.1:")
        worker = subprocess.Popen([exe, "--redis-url", url, "worker", "--fake", "affine", "--block-ms", "100"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        with Client(url, timeout_s=30) as c:
            # the readiness probe: a worker process registers the model once it consumes
            assert wait_until(lambda: c.model_status("affine").ready, timeout_s=30)
            res = c.infer("affine", affine_inputs(7))
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(7)["x"]))
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        r = redis.Redis.from_url(url)
        assert all(int(g["pending"]) == 0 for g in r.xinfo_groups("headrace:{affine}:requests"))
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
    assert server.returncode == 0, "the redis command stops cleanly on SIGINT"
