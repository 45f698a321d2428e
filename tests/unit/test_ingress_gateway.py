"""The ingress' call table and request ids, without Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest

from headrace.client import errors as E
from headrace.cluster.serve.app import IngressArgs
from headrace.cluster.serve.auth import ApiKeys, Caller, key_entry
from headrace.cluster.serve.gateway import CallTable, Gateway, _Call

pytestmark = pytest.mark.timeout(30)


class Forgetting:
    def __init__(self) -> None:
        self.forgotten: list[Any] = []

    def __call__(self, ticket: Any) -> None:
        self.forgotten.append(ticket)


def call(forget: Forgetting, ticket: str) -> _Call:
    return _Call(forget=forget, ticket=ticket)  # type: ignore[arg-type]


def test_a_call_that_ends_is_forgotten_unless_it_is_idempotent() -> None:
    forget = Forgetting()
    table = CallTable(capacity=10, ttl_s=0.05)
    assert table.add("a", call(forget, "ticket-a")) and table.add("b", call(forget, "ticket-b"))
    table.end("a", keep=False)
    table.end("b", keep=True)
    assert forget.forgotten == ["ticket-a"] and table.get("a") is None and table.get("b") is not None
    time.sleep(0.06)
    assert table.get("b") is None and forget.forgotten == ["ticket-a", "ticket-b"] and len(table) == 0


def test_a_full_table_refuses_new_calls_but_makes_room_from_ended_ones() -> None:
    forget = Forgetting()
    table = CallTable(capacity=2, ttl_s=60)
    assert table.add("a", call(forget, "ta")) and table.add("b", call(forget, "tb"))
    assert not table.add("c", call(forget, "tc"))  # both in flight
    table.end("a", keep=True)  # kept for retries, but it may make room
    assert table.add("c", call(forget, "tc")) and forget.forgotten == ["ta"]
    table.clear()
    assert len(table) == 0 and sorted(forget.forgotten) == ["ta", "tb", "tc"]


def test_request_ids_are_random_or_scoped_to_the_caller() -> None:
    gw = Gateway(IngressArgs(api_keys=(key_entry("alice", "ka"), key_entry("bob", "kb"))), env={})
    alice = gw.keys.authenticate({"x-api-key": "ka"})
    bob = gw.keys.authenticate({"x-api-key": "kb"})
    assert isinstance(alice, Caller) and isinstance(bob, Caller)
    assert gw.request_id(alice, "m", None) != gw.request_id(alice, "m", None)
    same = gw.request_id(alice, "m", "k-1")
    assert same == gw.request_id(alice, "m", "k-1") and same.startswith("idem-")
    assert same != gw.request_id(bob, "m", "k-1") and same != gw.request_id(alice, "other", "k-1")
    # Another ingress with the same keys (another replica) derives the same id.
    assert Gateway(IngressArgs(api_keys=(key_entry("alice", "ka"),)), env={}).request_id(alice, "m", "k-1") == same
    for bad in ("", "x" * 129, "tab\there", "naïve"):
        with pytest.raises(E.DecodeError):
            gw.request_id(alice, "m", bad)
    anonymous = ApiKeys([], env={}).authenticate({})
    assert anonymous is not None
    with pytest.raises(E.DecodeError, match="authentication"):
        gw.request_id(anonymous, "m", "k-1")
