"""Helpers of the ACL tests: the users of docs/security.md made verbatim, the ACL log, and
the table of commands a producer must be refused (issue #10)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from headrace.client.functions import RELAY_FUNCTION, SUBMIT_FUNCTION
from headrace.client.keys import ModelKeys
from headrace.client.protocol import Envelope, Request, encode_request

ROOT = Path(__file__).resolve().parents[2]
NS = "headrace"


def acl_lines() -> list[str]:
    """The ``ACL SETUSER`` lines of docs/security.md (between the acl-rules markers)."""
    doc = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- acl-rules.*?```text\n(.*?)```", doc, flags=re.S)
    assert block, "docs/security.md lost its acl-rules block"
    lines = [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 4 and all(ln.startswith("ACL SETUSER ") for ln in lines)
    return lines


def tokens(line: str) -> list[str]:
    """Split an ACL line into arguments; a ``( ... )`` selector is one argument."""
    out: list[str] = []
    depth, cur = 0, ""
    for ch in line:
        if ch == " " and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur:
        out.append(cur)
    return out


def create_user(admin: redis.Redis, role: str, password: str, client: str = "") -> str:
    line = next(ln for ln in acl_lines() if f"SETUSER headrace-{role} " in ln or f"SETUSER headrace-{role}-" in ln)
    line = line.replace("<ns>", NS).replace("<client>", client).replace("<password>", password)
    args = tokens(line)
    assert admin.execute_command(*args) in (b"OK", "OK", True)
    return args[2]  # the user name


def fcall(keys: ModelKeys, rid: str, reply_to: str, body: bytes = b"\x81\xa4text\xa1x",
          limits: str | None = None, **extra: Any) -> tuple[Any, ...]:
    """``FCALL headrace_submit`` of one entry (max_backlog 0)."""
    entry = {"v": "1", "id": rid, "reply_to": reply_to, "body": body, **extra}
    return ("FCALL", SUBMIT_FUNCTION, 3, keys.requests, limits or keys.limits, keys.inbox, keys.group, 0,
            *itertools.chain.from_iterable(entry.items()))


def url_for(base_url: str, user: str, password: str) -> str:
    return base_url.replace("redis://", f"redis://{user}:{password}@", 1)


def denials(admin: redis.Redis, user: str) -> list[dict[Any, Any]]:
    """ACL LOG entries of ``user``, except redis-py's optional CLIENT SETINFO on connect
    (Redis >= 7.2 only; see docs/security.md)."""
    entries = admin.execute_command("ACL", "LOG", "128")
    out = []
    for e in entries:
        d = dict(zip(e[::2], e[1::2], strict=True)) if isinstance(e, list) else e
        name = d.get(b"username", d.get("username"))
        if name in (user, user.encode()) and d.get(b"object") != b"client|setinfo":
            out.append(d)
    return out


EVIL_LIBRARY = "#!lua name=headrace\nredis.register_function('headrace_submit', function() return {1, '0-1'} end)"
MAX_ID = "18446744073709551615-18446744073709551615"
NOPE = "no permissions|can't run this command"


def relay_call(keys: ModelKeys, fourth: str) -> tuple[Any, ...]:
    return ("FCALL", RELAY_FUNCTION, 4, keys.requests, keys.limits, keys.inbox, fourth, 1000,
            "r", "c", "e", "d", "t", "b", "f", "0")


def destructive_commands(keys: ModelKeys, entry_id: str) -> list[tuple[tuple[Any, ...], str]]:
    """Every command of issue #10 item 2 and its relatives, with what refuses it."""
    return (stream_and_script_commands(keys, entry_id) + inbox_commands(keys)
            + relay_and_admin_commands(keys) + submit_function_commands(keys))


def stream_and_script_commands(keys: ModelKeys, entry_id: str) -> list[tuple[tuple[Any, ...], str]]:
    """The request stream, its group, and the ways to run or replace Lua."""
    req, nope = keys.requests, NOPE
    other = ModelKeys(NS, "length")
    return [
        (("XADD", req, "MAXLEN", "0", "*", "v", "1"), nope),            # deletes every queued request
        (("XADD", req, "MINID", MAX_ID, "*", "v", "1"), nope),
        (("XADD", req, MAX_ID, "v", "1"), nope),                        # every later add would fail
        (("XADD", req, "*", "v", "1"), nope),                           # no XADD at all in strict mode
        (("XGROUP", "CREATE", req, "evil", "0"), nope),                # pins trimming forever
        (("XGROUP", "CREATE", other.requests, "workers", "$", "MKSTREAM"), nope),  # skips earlier entries
        (("XGROUP", "SETID", req, "workers", "$"), nope),
        (("XGROUP", "DESTROY", req, "workers"), nope),
        (("XGROUP", "CREATECONSUMER", req, "workers", "evil"), nope),
        (("EVAL", "return redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)", 1, req), nope),  # any Lua
        (("EVAL", "return redis.call('XADD', KEYS[1], 'MAXLEN', 0, '*', 'a', 'b')", 1, req), nope),
        (("EVAL", "return redis.call('DEL', KEYS[1])", 1, keys.inbox), nope),
        (("EVALSHA", "0" * 40, 1, req), nope),
        (("SCRIPT", "LOAD", "return 1"), nope),
        (("SCRIPT", "FLUSH"), nope),
        (("FUNCTION", "LOAD", "REPLACE", EVIL_LIBRARY), nope),          # replace the submit path
        (("FUNCTION", "DELETE", "headrace"), nope),
        (("FUNCTION", "FLUSH"), nope),
        (("FUNCTION", "RESTORE", b"\x00", "FLUSH"), nope),
        (("XTRIM", req, "MAXLEN", "0"), nope),
        (("XDEL", req, entry_id), nope),
        (("XSETID", req, MAX_ID), nope),
        (("DEL", req), nope),
        (("UNLINK", req), nope),
        (("RENAME", req, keys.prefix + ":x"), nope),
        (("EXPIRE", req, "1"), nope),
    ]


def inbox_commands(keys: ModelKeys) -> list[tuple[tuple[Any, ...], str]]:
    """The strict-mode inbox."""
    inbox, nope = keys.inbox, NOPE
    return [
        # The inbox: append only; nothing taken, reordered, read or deleted.
        (("LTRIM", inbox, "1", "0"), nope),
        (("DEL", inbox), nope),
        (("UNLINK", inbox), nope),
        (("EXPIRE", inbox, "1"), nope),
        (("LPOP", inbox), nope),
        (("RPOP", inbox, "100"), nope),
        (("BLPOP", inbox, "0.01"), nope),
        (("LMOVE", inbox, inbox, "LEFT", "RIGHT"), nope),
        (("LREM", inbox, "0", "x"), nope),
        (("LSET", inbox, "0", "x"), nope),
        (("LINSERT", inbox, "BEFORE", "x", "y"), nope),
        (("LRANGE", inbox, "0", "-1"), nope),
        (("LPUSH", inbox, "x"), nope),                                  # would jump the queue
        (("RENAME", inbox, keys.prefix + ":x"), nope),
    ]


def relay_and_admin_commands(keys: ModelKeys) -> list[tuple[tuple[Any, ...], str]]:
    """The relay function, the limits hash, the registry, the DLQ and server administration."""
    nope = NOPE
    return [
        # The relay is the workers': the DLQ key is not the producer's, and with the
        # producer's own keys the function refuses before it pops anything.
        (relay_call(keys, keys.dlq), nope),
        (relay_call(keys, keys.inbox), "decode_error"),
        (("XADD", keys.limits, "*", "a", "b"), nope),                  # break the function's HGET
        (("HSET", keys.limits, "max_payload_bytes", "999999999999"), nope),  # lift the size limit
        (("HSET", keys.limits, "submit_mode", "direct"), nope),
        (("DEL", keys.limits), nope),
        (("HSET", f"{NS}:models", "affine", "{}"), nope),
        (("XADD", keys.dlq, "*", "a", "b"), nope),
        (("CONFIG", "SET", "maxmemory", "1"), nope),
        (("CLIENT", "KILL", "TYPE", "normal"), nope),
        (("CLIENT", "PAUSE", "100"), nope),
        (("FLUSHDB",), nope),
        (("ACL", "SETUSER", "headrace-producer-alice", "+@all"), nope),
    ]


def submit_function_commands(keys: ModelKeys) -> list[tuple[tuple[Any, ...], str]]:
    """Calls of the submit function that try to reach beyond the caller's own request."""
    nope = NOPE
    other = ModelKeys(NS, "length")
    return [
        # Through the function: everything it adds is checked, nothing else is reachable.
        (fcall(keys, "ok-1", keys.reply("alice"), limits=other.limits), "decode_error"),   # another model's limit
        (fcall(keys, "big", keys.reply("alice"), body=b"\0" * (4 << 20)), "payload_too_large"),
        (fcall(keys, "pad", keys.reply("alice"), pad=b"\0" * (4 << 20)), "payload_too_large"),  # unknown field
        (fcall(keys, "many", keys.reply("alice"), **{f"f{i}": "x" for i in range(4000)}), "payload_too_large"),
        (fcall(keys, "spoof", keys.reply("bob")), "decode_error"),     # results into bob's stream
        (fcall(keys, "bad id!", keys.reply("alice")), "decode_error"),
        (fcall(keys, "big-ms", keys.reply("alice"), ts_ms="9" * 400), "decode_error"),
        (("FCALL", SUBMIT_FUNCTION, 3, keys.dlq, keys.limits, keys.inbox, "workers", 0, "v", "1"), nope),
    ]


def raw_pushes(keys: ModelKeys) -> tuple[list[bytes], list[bytes]]:
    """What a producer can RPUSH onto the inbox by hand: (elements the relay dead-letters,
    well-formed elements it relays). None of it touches anything already queued."""
    def mp(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=False)

    alice = keys.reply("alice").encode()
    refused = [
        b"garbage",                                                   # not msgpack
        b"\x91" + mp(b"\0" * (5 << 20)),                              # 5 MiB: described, never decoded
        msgpack.packb([b"v", b"1", b"id", b"bin"], use_bin_type=True),  # bin types
        mp({"v": "1", "id": "map"}),                                   # a map
        mp([x for i in range(4000) for x in (f"f{i}".encode(), b"x")]),  # 4000 fields
        mp([b"id", b"a", b"id", b"b"]),                                # a name twice
    ]
    relayed = [
        # A well-formed request: a submit that skipped the function (and its backpressure).
        mp([x for kv in encode_request(Request(envelope=Envelope(request_id="raw-ok", reply_to=alice.decode()),
                                               inputs={"x": np.ones(4, np.float32)})).items() for x in kv]),
        # Bounded but invalid: the worker answers it on its (valid) reply_to.
        mp([b"v", b"1", b"id", b"raw-bad", b"reply_to", alice, b"body", b"\xc1", b"ts_ms", b"9" * 400]),
    ]
    return refused, relayed
