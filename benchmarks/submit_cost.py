"""What the checked submit path costs Redis: ``FCALL headrace_submit`` in direct mode
(checks + ``XADD``) and in strict mode (checks + ``RPUSH`` onto the inbox, then the workers'
``FCALL headrace_relay`` moving the inbox into the stream in steps of 256), against the
unchecked backpressure script producers used before it (``EVALSHA``, the same backlog
reading and ``XADD``, no entry checks) and a bare ``XADD`` of the same entry, side by side on
one private ``redis-server``.

For each entry kind (an ``affine`` tensor request, a ``minilm``-sized text, a 100 KB body)
it adds ``--requests`` entries each way in pipelines of 256 and prints Redis' own CPU time
per request (``INFO commandstats``, microseconds; a script's or function's figure includes
the commands it runs), strict = submit + its share of a relay call, and the ratio strict /
direct. Asserts nothing.

    .venv/bin/python -m benchmarks.submit_cost [--requests 20000]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import numpy as np
import redis

from headrace.client import protocol as P
from headrace.client.functions import RELAY_FUNCTION, SUBMIT_FUNCTION, ensure_library
from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.pipeline.ops import DLQ_ENTRY_BYTES, DLQ_ENTRY_FIELDS, DLQ_SCRIPT_NAMES

PIPELINE = 256
# The submit script before the submit function (issue #10): backlog check and XADD, no checks
# of the entry; KEYS[1] the stream, ARGV group, max_backlog, fields.
UNCHECKED_SCRIPT = """
local stream = KEYS[1]
local group = ARGV[1]
local max_backlog = tonumber(ARGV[2]) or 0

local function find_group()
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and groups['err'] then
    -- "no such key": the stream does not exist yet. A WRONGTYPE key fails in XGROUP below.
    return nil
  end
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info end
  end
  return nil
end

local backlog
local info = find_group()
if info == nil then
  redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  backlog = redis.call('XLEN', stream)
else
  local lag = info['lag']
  if lag == nil or lag == false then
    -- Lag is unknown (Redis < 7, or entries were deleted inside the unread range). XLEN
    -- counts every entry still in the stream: the unread and the pending ones, plus acked
    -- entries not trimmed yet, so it is a safe upper bound of lag + pending.
    backlog = redis.call('XLEN', stream)
  else
    -- Every unread and every pending entry is still in the stream (trimming keeps them),
    -- so XLEN bounds lag + pending. Redis 7.0 can report a stale, too large lag for good
    -- after an AOF rewrite followed by a restart (the group's entries-read is reloaded
    -- from the rewrite); unbounded, that phantom lag would refuse requests to an empty queue.
    backlog = math.min(tonumber(lag) + tonumber(info['pending']), redis.call('XLEN', stream))
  end
end

if max_backlog > 0 and backlog >= max_backlog then
  return {0, backlog}
end
local id = redis.call('XADD', stream, '*', unpack(ARGV, 3))
return {1, id}
"""


def entries(kind: str, n: int, keys: ModelKeys) -> list[dict[bytes, bytes]]:
    reply = keys.reply("bench")
    text = "A sentence of about the length MiniLM usually gets, give or take a few words here."
    inputs = {"affine": {"x": np.ones(4, "f4")}, "100KB": {"x": np.ones(25_000, "f4")}}.get(kind, {})
    out = []
    for i in range(n):
        env = P.Envelope(f"r-{i}", reply, model=keys.model)
        req = P.Request(env, inputs=inputs) if inputs else P.Request(env, text=text)
        out.append(P.encode_request(req))
    return out


def usec_per_call(r: redis.Redis, command: str) -> float:
    stats: Any = r.info("commandstats").get(f"cmdstat_{command}", {})
    return float(stats.get("usec_per_call", 0.0))


def _timed(r: redis.Redis, command: str, build: Any, batch: list[dict[bytes, bytes]], stream: str) -> float:
    """Redis CPU per call of ``command`` while sending ``build(fields)`` for every entry."""
    r.delete(stream)
    r.config_resetstat()
    for chunk in _chunks(batch):
        pipe = r.pipeline(transaction=False)
        for fields in chunk:
            pipe.execute_command(*build(fields))
        out = pipe.execute(raise_on_error=True)
        assert all(isinstance(o, bytes) or int(o[0]) == 1 for o in out)
    r.delete(stream)
    return usec_per_call(r, command)


def _relay_usec(r: redis.Redis, keys: ModelKeys, n: int) -> float:
    """Redis CPU per request of relaying ``n`` inbox elements in calls of PIPELINE."""
    r.config_resetstat()
    relay_keys = [keys.requests, keys.limits, keys.inbox, keys.dlq]
    moved = 0
    while moved < n:
        added, _, _ = r.execute_command("FCALL", RELAY_FUNCTION, 4, *relay_keys, PIPELINE, *DLQ_SCRIPT_NAMES,
                                        DLQ_ENTRY_BYTES, DLQ_ENTRY_FIELDS, 0)
        assert int(added) > 0, "the inbox ran dry before every request was relayed"
        moved += int(added)
    stats: Any = r.info("commandstats").get("cmdstat_fcall", {})
    r.delete(keys.requests)
    return float(stats.get("usec", 0.0)) / n


def run(r: redis.Redis, kind: str, n: int, script_sha: str) -> tuple[float, float, float, float, float]:
    """Redis CPU per request (us): bare XADD, old script, direct FCALL, strict FCALL, relay."""
    keys = ModelKeys("bench", kind)
    batch = entries(kind, n, keys)

    def flat(fields: dict[bytes, bytes]) -> list[bytes]:
        return list(itertools.chain.from_iterable(fields.items()))

    def submit(f: dict[bytes, bytes]) -> tuple[Any, ...]:
        return ("FCALL", SUBMIT_FUNCTION, 3, keys.requests, keys.limits, keys.inbox, "workers", 0, *flat(f))

    bare = _timed(r, "xadd", lambda f: ("XADD", keys.requests, "*", *flat(f)), batch, keys.requests)
    script = _timed(r, "evalsha", lambda f: ("EVALSHA", script_sha, 1, keys.requests, "workers", 0, *flat(f)),
                    batch, keys.requests)
    r.hset(keys.limits, "submit_mode", "direct")  # what workers with --submit-mode direct publish
    direct = _timed(r, "fcall", submit, batch, keys.requests)
    r.hset(keys.limits, "submit_mode", "strict")
    strict = _timed(r, "fcall", submit, batch, keys.requests)
    relay = _relay_usec(r, keys, n)
    return bare, script, direct, strict, relay


def _chunks(items: list[Any]) -> Any:
    for i in range(0, len(items), PIPELINE):
        yield items[i:i + PIPELINE]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=20_000)
    args = ap.parse_args()
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        ensure_library(r)
        sha = r.script_load(UNCHECKED_SCRIPT)
        print(f"{'entry':<8} {'bare XADD':>10} {'old script':>11} {'direct':>8} {'strict submit':>14} "
              f"{'+ relay':>8} {'strict total':>13} {'strict/direct':>14}   (us of Redis CPU per request)")
        for kind, n in (("affine", args.requests), ("text", args.requests), ("100KB", max(1, args.requests // 20))):
            bare, script, direct, strict, relay = run(r, kind, n, sha)
            print(f"{kind:<8} {bare:>10.2f} {script:>11.2f} {direct:>8.2f} {strict:>14.2f} {relay:>8.2f} "
                  f"{strict + relay:>13.2f} {(strict + relay) / direct:>14.2f}")
        r.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
