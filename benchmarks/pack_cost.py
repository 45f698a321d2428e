"""What packing a Redis command costs the SDK and the worker: redis-py's asyncio packer
(Python) against the C packer headrace's asyncio connections use (``hiredis.pack_command``,
:mod:`headrace.client.packing`), side by side in one run, on the commands of the hot path:

* the SDK's ``FCALL headrace_submit`` of one text sample and of one 64-sample tensor entry
  (``client.submit.submit_command``);
* the worker's commit script for a batch of 256 single-sample replies
  (``RedisBroker._commit_args``, the ``EVALSHA`` arguments).

Prints microseconds per command (best of ``--repeat`` timings of ``--number`` packs each)
and the ratio. Checks that both packers produce the same bytes; asserts nothing else.

    .venv/bin/python -m benchmarks.pack_cost [--number 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import timeit
from typing import Any

import numpy as np
from redis.asyncio.connection import Connection

from headrace.client.keys import ModelKeys
from headrace.client.packing import CPackedConnection
from headrace.client.results import Result, Timings, encode_result
from headrace.client.submit import prepare_request, submit_command
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.pipeline.ops import Reply
from headrace.workers.settings import WorkerSettings


def commands() -> dict[str, tuple[Any, ...]]:
    """The hot-path commands, built by the code that sends them."""
    keys = ModelKeys("headrace", "minilm")
    reply_to = keys.reply("bench-client")
    text = prepare_request(keys, reply_to, None, "A sentence of about the length MiniLM usually gets.",
                           request_id=None, deadline_s=30.0)
    block = prepare_request(keys, reply_to, {"x": np.ones((64, 4), "f4")}, None, request_id=None, deadline_s=30.0)
    broker = RedisBroker(WorkerSettings(model="minilm"))
    ops = []
    for i in range(256):
        res = Result(f"r-{i}", "ok", outputs={"y": np.ones(4, "f4")}, timings=Timings(), model="minilm")
        ops.append(Reply(f"1-{i}", f"r-{i}", reply_to, encode_result(res)))
    commit_keys, commit_args = broker._commit_args(ops, 1_764_640_000_000)
    return {
        "submit FCALL, one text": submit_command(keys, text, 0),
        "submit FCALL, 64-sample entry": submit_command(keys, block, 0),
        "commit EVALSHA, 256 replies": ("EVALSHA", "0" * 40, len(commit_keys), *commit_keys, *commit_args),
    }


def _best_us(conn: Connection, cmd: tuple[Any, ...], number: int, repeat: int) -> float:
    """Microseconds per ``conn.pack_command(*cmd)``, best of ``repeat`` timings."""
    return min(timeit.repeat(lambda: conn.pack_command(*cmd), number=number, repeat=repeat)) / number * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--number", type=int, default=2000, help="packs per timing")
    ap.add_argument("--repeat", type=int, default=5, help="timings per packer (the best is kept)")
    args = ap.parse_args()
    python, c = Connection(), CPackedConnection()
    print(f"{'command':<32} {'args':>6} {'python us':>10} {'C us':>8} {'python / C':>11}")
    for name, cmd in commands().items():
        assert b"".join(bytes(p) for p in python.pack_command(*cmd)) == b"".join(c.pack_command(*cmd))
        number = max(1, args.number // (1 + len(cmd) // 64))
        py_us, c_us = (_best_us(conn, cmd, number, args.repeat) for conn in (python, c))
        print(f"{name:<32} {len(cmd):>6} {py_us:>10.2f} {c_us:>8.2f} {py_us / c_us:>10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
