"""Deeply nested JSON is refused before the C decoder recurses into it, whatever recursion
limit the process runs with (a library may raise it: onnx2tf sets 2**31-1 at import)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from headrace.client import errors as E
from headrace.cluster.serve.http_body import MAX_JSON_DEPTH, json_depth, parse_body

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("raw", "depth"), [
    (b"", 0),
    (b'{"text": "hi"}', 1),
    (b'{"inputs": {"x": [[1, 2], [3, 4]]}}', 4),
    (b'{"text": "[[[[{{{{"}', 1),                 # brackets inside a string do not nest
    (b'{"text": "a \\" [[[[ \\" b"}', 1),         # nor after an escaped quote
    (b'{"text": "ends in a backslash \\\\", "x": [[1]]}', 3),  # an escaped backslash before the closing quote
    (b"[" * 50 + b"]" * 50, 50),
])
def test_json_depth_counts_brackets_outside_strings(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth
    if raw:
        json.loads(raw)  # the cases are valid JSON


@pytest.fixture
def unlimited_recursion() -> Iterator[None]:
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(2**31 - 1)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def test_a_deep_body_is_a_decode_error_even_with_the_recursion_limit_raised(unlimited_recursion: None) -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001):
        with pytest.raises(E.DecodeError, match=f"deeper than {MAX_JSON_DEPTH}"):
            parse_body(raw)
    tensor = b'{"inputs": {"x": ' + b"[" * 8 + b"1" + b"]" * 8 + b"}}"
    assert parse_body(tensor).inputs is not None, "the deepest tensor a model may take still parses"


def test_without_the_check_the_same_body_kills_the_process() -> None:
    """What the check prevents, shown in a child process: json.loads itself overflows the C
    stack once the recursion limit is out of the way."""
    code = ("import json, sys; sys.setrecursionlimit(2**31 - 1); "
            "json.loads('[' * 10_000_000 + ']' * 10_000_000)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=50)
    assert proc.returncode != 0 and proc.returncode in (-11, 139, -6, 134), proc.returncode
