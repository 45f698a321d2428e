"""The Node.js producer (examples/node_producer) against a private Redis with fake workers;
results checked against the fake model computed in Python and decoded with the Python codec."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import affine_reference
from tests.support.client import start_fake_worker
from tests.support.worker import queued, queued_requests

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node_producer"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def node_example() -> Path:
    """examples/node_producer with its npm dependencies installed (skip when impossible)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not on PATH: the Node.js producer cannot run here")
    major = subprocess.run([node, "-p", "process.versions.node.split('.')[0]"], capture_output=True, text=True)
    if major.returncode != 0 or int(major.stdout.strip() or 0) < 20:
        pytest.skip(f"Node.js >= 20 needed by the redis npm package, found {major.stdout.strip() or '?'}")
    lock = EXAMPLE / "package-lock.json"
    stamp = EXAMPLE / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True,
                              text=True, timeout=180)
        if proc.returncode != 0:
            pytest.skip(f"npm ci failed (no registry access?): {proc.stderr.strip()[-300:]}")
    return EXAMPLE


@pytest.fixture
def workers(redis_url: str) -> Iterator[None]:
    ws = [start_fake_worker(redis_url, "affine", "affine"), start_fake_worker(redis_url, "length", "length")]
    yield
    for w in ws:
        w.stop()


def run_node(example: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["node", "producer.js", *args], cwd=example, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"node exited {proc.returncode}: {proc.stderr}")
    return proc


def lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_node_producer_affine_results_match_the_model(node_example: Path, redis_url: str, workers: None) -> None:
    out = lines(run_node(node_example, "--url", redis_url, "--model", "affine", "--count", "3",
                         "--values", "0.5,-1,2,8"))
    assert len(out) == 3
    base = np.array([0.5, -1, 2, 8], np.float32)
    assert len({res["id"] for res in out}) == 1 and [res["sample"] for res in out] == [0, 1, 2]  # one entry
    for k, res in enumerate(out):
        assert res["status"] == "ok" and res["model"] == "affine" and res["id"].startswith("node-")
        assert res["outputs"]["y"]["dtype"] == "float32" and res["outputs"]["y"]["shape"] == [4]
        np.testing.assert_array_equal(np.array(res["outputs"]["y"]["data"], np.float32),
                                      affine_reference(base + np.float32(k)))
        assert res["timings"]["batch_size"] >= 1 and res["timings"]["worker"]


def test_node_requests_decoded_by_python(node_example: Path, redis_url: str, workers: None) -> None:
    """--no-wait leaves the results in the reply stream; decode them with the Python codec."""
    sub = json.loads(run_node(node_example, "--url", redis_url, "--count", "2", "--chunk", "1", "--no-wait").stdout)
    r = redis.Redis.from_url(redis_url)
    reply_to, ids = sub["reply_to"], sub["ids"]
    assert reply_to.startswith("headrace:{affine}:reply:node-")
    results: dict[str, P.Result] = {}
    cursor = "0-0"
    for _ in range(50):
        for _stream, entries in r.xread({reply_to: cursor}, block=200) or []:
            for eid, fields in entries:
                cursor = eid.decode()
                res = P.decode_result(fields)
                results[res.request_id] = res
        if len(results) == 2:
            break
    assert set(results) == set(ids)
    for k, rid in enumerate(ids):
        np.testing.assert_array_equal(results[rid].outputs["y"],
                                      affine_reference(np.array([1, 2, 3, 4], np.float32) + np.float32(k)))
    assert r.exists(f"headrace:{{affine}}:done:{ids[0]}") == 1

    # 5 samples in chunks of 2: entries of 2, 2 and 1 samples (the last a plain request).
    sub = json.loads(run_node(node_example, "--url", redis_url, "--count", "5", "--chunk", "2", "--no-wait").stdout)
    reply_to, ids = sub["reply_to"], sub["ids"]
    got: dict[str, P.Result] = {}
    for _ in range(50):
        for _stream, entries in r.xread({reply_to: "0-0"}, block=200) or []:
            got = {res.request_id: res for res in (P.decode_result(f) for _eid, f in entries)}
        if len(got) == 3:
            break
    assert len(ids) == 3 and set(got) == set(ids)
    outs = [s.outputs["y"] for rid in ids[:2] for s in got[rid].samples] + [got[ids[2]].outputs["y"]]
    for k, y in enumerate(outs):
        np.testing.assert_array_equal(y, affine_reference(np.array([1, 2, 3, 4], np.float32) + np.float32(k)))


def test_node_producer_spreads_entries_over_a_partitioned_models_partitions(node_example: Path,
                                                                          redis_url: str) -> None:
    """Workers with partitions=3 read three request streams: the Node producer learns P from
    their registry records, puts each entry on partition crc32(id) % 3 with that partition's
    reply stream, and collects every answer from the three reply streams."""
    worker = start_fake_worker(redis_url, "affine", "parted", partitions=3)
    try:
        r = redis.Redis.from_url(redis_url)
        for _ in range(100):  # the first heartbeat registers partitions=3
            raw = r.hget("headrace:models", "parted")
            if raw and any(w.get("partitions") == 3 for w in json.loads(raw)["workers"].values()):
                break
            time.sleep(0.05)
        out = lines(run_node(node_example, "--url", redis_url, "--model", "parted", "--count", "24", "--chunk", "1"))
        assert len(out) == 24 and all(res["status"] == "ok" for res in out)
        for k, res in enumerate(out):
            np.testing.assert_array_equal(np.array(res["outputs"]["y"]["data"], np.float32),
                                          affine_reference(np.array([1, 2, 3, 4], np.float32) + np.float32(k)))
        done = {p: [k.decode() for k in r.scan_iter(f"headrace:{{parted~{p}}}:done:*")] for p in range(3)}
        assert sum(len(v) for v in done.values()) == 24
        for p, keys in done.items():  # every id's dedupe marker lies in the partition its crc32 names
            assert keys and all(zlib.crc32(k.rsplit(":done:", 1)[1].encode()) % 3 == p for k in keys)
        assert not r.exists("headrace:{parted}:requests")

        bad = run_node(node_example, "--url", redis_url, "--model", "parted", "--partitions", "2000", check=False)
        assert bad.returncode != 0 and "--partitions must be between 1 and 1024" in bad.stderr
    finally:
        worker.stop()


def test_node_text_plain_xadd_and_errors(node_example: Path, redis_url: str, workers: None) -> None:
    out = lines(run_node(node_example, "--url", redis_url, "--model", "length", "--text", "naïve café", "--plain"))
    assert out[0]["status"] == "ok" and out[0]["outputs"]["length"]["data"] == [len("naïve café")]
    failed = run_node(node_example, "--url", redis_url, "--values", "1,2,3", check=False)
    bad = lines(failed)
    assert bad[0]["status"] == "error" and bad[0]["code"] == E.BAD_SHAPE and not bad[0]["outputs"]
    assert failed.returncode == 2  # as headrace submit: a sample answered with an error


def test_node_submit_function_refuses_when_the_queue_is_full(node_example: Path, redis_url: str) -> None:
    # no worker for "idle": the first request is queued, the second is refused by the function
    proc = run_node(node_example, "--url", redis_url, "--model", "idle", "--count", "2", "--max-backlog", "1",
                    "--chunk", "1", "--no-wait", check=False)
    assert proc.returncode == 4 and "queue_full" in proc.stderr
    r = redis.Redis.from_url(redis_url)
    assert not r.exists("headrace:{idle}:requests")  # producers never create streams or groups
    [fields] = queued_requests(r, ModelKeys("headrace", "idle"))  # waiting in the inbox
    req = P.decode_request(fields)
    assert req.envelope.model == "idle" and req.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(req.inputs["x"], [1, 2, 3, 4])


def test_node_producer_gets_the_functions_refusal_with_its_wire_code(node_example: Path, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    r.hset("headrace:{affine}:limits", "max_payload_bytes", "100")  # what a worker with that limit publishes
    proc = run_node(node_example, "--url", redis_url, "--model", "affine", "--no-wait", check=False)
    assert proc.returncode == 5 and "[payload_too_large]" in proc.stderr and "max_payload_bytes=100" in proc.stderr
    assert queued(r, ModelKeys("headrace", "affine")) == 0


def test_node_sends_string_tensors_to_a_model_that_takes_strings(node_example: Path, redis_url: str,
                                                                 tmp_path: Path) -> None:
    from tests.support.byom import category_mapper, models_add, serving

    models_add(tmp_path / "repo", "lookup", category_mapper(tmp_path / "lookup.onnx", ["setosa", "versicolor",
                                                                                      "virginica"]))
    with serving(redis_url, tmp_path / "repo", "lookup", tmp_path / "worker.log"):
        args = ["--url", redis_url, "--model", "lookup", "--input", "word", "--dtype", "string", "--scalar"]
        one = lines(run_node(node_example, *args, "--values", "virginica"))
        many = lines(run_node(node_example, *args, "--values", "versicolor", "--count", "5", "--chunk", "2"))
        unknown = lines(run_node(node_example, *args, "--values", "rose"))
    assert one[0]["status"] == "ok" and one[0]["outputs"]["code"]["data"] == [2]
    assert len(many) == 5 and all(r["status"] == "ok" and r["outputs"]["code"]["data"] == [1] for r in many)
    assert unknown[0]["outputs"]["code"]["data"] == [-1]
