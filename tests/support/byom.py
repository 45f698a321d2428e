"""Helpers for the bring-your-own-model tests: ``headrace models add`` and ``headrace worker``
as real processes, and two producers (the SDK, and raw redis-py + msgpack as
docs/protocol.md describes) that both send every sample at once, so batches form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from headrace.client.keys import registry_key
from headrace.models.repository.store import Manifest, ModelRepository
from tests.support.polling import poll_until

ROOT = Path(__file__).resolve().parents[2]
HEADRACE = [sys.executable, "-m", "headrace.cluster.cli.main"]
Array = np.ndarray[Any, Any]


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def models_add(repo: Path, name: str, source: Path | str, *args: str, expect_ok: bool = True,
               timeout_s: float = 600.0) -> subprocess.CompletedProcess[str]:
    """``headrace --repo REPO models add NAME SOURCE ARGS`` in a child process."""
    proc = subprocess.run([*HEADRACE, "--repo", str(repo), "models", "add", name, str(source), *args],
                          capture_output=True, text=True, timeout=timeout_s, env=_env(), cwd=ROOT, check=False)
    if expect_ok:
        assert proc.returncode == 0, f"models add failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def describe(url: str, model: str) -> dict[str, Any]:
    """``headrace models describe MODEL --json`` (read from the registry in Redis)."""
    proc = subprocess.run([*HEADRACE, "--redis-url", url, "models", "describe", model, "--json"], capture_output=True,
                          text=True, timeout=60, env=_env(), cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def latest(repo: Path, name: str) -> Manifest:
    return ModelRepository(repo).load_manifest(name)


class Worker:
    """``headrace worker --model NAME`` in a child process (log in ``log_path``)."""

    def __init__(self, url: str, repo: Path, model: str, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [*HEADRACE, "--redis-url", url, "--repo", str(repo), "--log-level", "INFO", "worker", "--model", model,
               "--max-wait-ms", "100", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_registered(self, url: str, model: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """The model's registry entry once a worker registered it (fails if the worker exits)."""
        r = redis.Redis.from_url(url)

        def ready() -> Any:
            assert self.proc.poll() is None, f"worker exited {self.proc.returncode}:\n{self.log()}"
            raw = r.hget(registry_key("headrace"), model)
            return json.loads(raw) if raw else None

        return poll_until(ready, timeout_s, 0.1)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@contextmanager
def serving(url: str, repo: Path, model: str, log_path: Path, *args: str) -> Iterator[Worker]:
    w = Worker(url, repo, model, log_path, *args)
    try:
        w.wait_registered(url, model)
        yield w
    finally:
        w.stop()


def sdk_infer(url: str, model: str, samples: Sequence[Mapping[str, Array]] = (), texts: Sequence[str] = (),
              timeout_s: float = 60.0) -> list[Any]:
    """Submit every sample (or text) with the SDK, then collect: ok results in order."""
    from headrace.client import Client

    with Client(url) as c:
        if texts:
            tickets = [c.submit(model, text=t) for t in texts]
        else:
            tickets = [c.submit(model, dict(s)) for s in samples]
        results = c.collect(tickets, timeout_s=timeout_s)
    bad = [(r.code, r.message) for r in results if not r.ok]
    assert not bad, bad
    return list(results)


def _tensor(a: Array) -> dict[str, Any]:
    a = np.asarray(a, order="C")  # not ascontiguousarray: it turns a scalar into shape [1]
    if a.dtype.kind in "UO":  # docs/protocol.md: strings are a msgpack array of str
        return {"dtype": "string", "shape": list(a.shape), "data": [str(v) for v in a.ravel()]}
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.astype(a.dtype.newbyteorder("<")).tobytes()}


def raw_infer(url: str, model: str, samples: Sequence[Mapping[str, Array]] = (), texts: Sequence[str] = (),
              timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The docs/protocol.md producer: XADD entries by hand, XREAD the reply stream, decode the
    msgpack bodies. Returns ``{"outputs": {name: array}, "batch_size": n}`` in request order."""
    r = redis.Redis.from_url(url)
    reply = f"headrace:{{{model}}}:reply:raw-{os.getpid()}-{time.monotonic_ns()}"
    items = [{"text": t} for t in texts] or [{"inputs": {k: _tensor(v) for k, v in s.items()}} for s in samples]
    ids = [f"raw-{i}" for i in range(len(items))]
    pipe = r.pipeline(transaction=False)
    for rid, body in zip(ids, items, strict=True):
        pipe.xadd(f"headrace:{{{model}}}:requests", {"v": "1", "id": rid, "reply_to": reply, "deadline_ms": "0",
                                                     "body": msgpack.packb(body)})
    pipe.execute()
    got: dict[str, dict[str, Any]] = {}
    last = "0-0"
    give_up = time.monotonic() + timeout_s
    while len(got) < len(ids):
        assert time.monotonic() < give_up, f"raw producer: {len(got)}/{len(ids)} results"
        for _, entries in r.xread({reply: last}, block=500, count=100) or []:
            for eid, f in entries:
                last = eid
                assert f[b"status"] == b"ok", (f[b"code"], f.get(b"message"))
                body = msgpack.unpackb(f[b"body"])
                outs = {k: _from_wire(t) for k, t in body["outputs"].items()}
                got[f[b"id"].decode()] = {"outputs": outs, "batch_size": body["timings"].get("batch_size", 0)}
    r.delete(reply)
    return [got[i] for i in ids]


def _from_wire(t: Mapping[str, Any]) -> Array:
    if t["dtype"] == "string":
        return np.array(t["data"], dtype=object).reshape(t["shape"])
    return np.frombuffer(t["data"], np.dtype(t["dtype"]).newbyteorder("<")).reshape(t["shape"])


def max_batch_seen(results: Sequence[Any]) -> int:
    """Largest ``timings.batch_size`` among SDK results or raw results."""
    sizes = [r["batch_size"] if isinstance(r, dict) else r.timings.batch_size for r in results]
    return int(max(sizes, default=0))


def category_mapper(path: Path, words: Sequence[str]) -> Path:
    """An ONNX graph taking strings: ``word`` string [N] -> ``code`` int64 [N], the index of
    the word in ``words`` (-1 for any other), saved at ``path``."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    graph = h.make_graph([h.make_node("CategoryMapper", ["word"], ["code"], domain="ai.onnx.ml",
                                      cats_strings=list(words), cats_int64s=list(range(len(words))),
                                      default_int64=-1)], "lookup",
                         [h.make_tensor_value_info("word", T.STRING, ["N"])],
                         [h.make_tensor_value_info("code", T.INT64, ["N"])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("ai.onnx.ml", 3)]), str(path))
    return path
