"""The Lua scripts of the worker data plane, one file per atomic operation (``lua/*.lua``,
shipped as package data).

Every script runs atomically on the Redis server; each file documents its KEYS/ARGV and
the race it exists for. All keys a script touches are passed in KEYS. The request stream,
DLQ, dedupe markers, stats stream and the SDK's reply streams of one model share the
``{<model>}`` hash tag, so on Redis Cluster they live in one slot. ``reply_to`` is chosen by
the producer: the SDK always puts it in the model's slot; a foreign producer that picks a
key elsewhere still works on a single Redis (any key is local there) but gets CROSSSLOT on
a cluster.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Final

NAMES: Final = ("COMMIT", "READ", "CLAIM", "REFRESH", "RELEASE", "REPAIR_LAG", "TRIM", "CLEANUP", "REGISTER",
                "DLQ_REPLAY", "DLQ_PURGE", "CANCEL_MARKS")


@cache
def source(name: str) -> str:
    """The Lua source of script ``name`` (one of :data:`NAMES`).

    Raises:
        KeyError: no such script.
    """
    if name not in NAMES:
        raise KeyError(f"no Lua script {name!r}; scripts: {list(NAMES)}")
    return resources.files("headrace.workers.broker").joinpath("lua", f"{name.lower()}.lua").read_text("utf-8")


def __getattr__(name: str) -> str:
    # scripts.COMMIT etc.: the source text, read once.
    if name in NAMES:
        return source(name)
    raise AttributeError(name)
