"""The producer examples in docs/protocol.md work as written (redis-cli and raw redis-py)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from headrace.client import protocol as P
from tests.support.client import start_fake_worker

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

pytestmark = pytest.mark.timeout(60)


def _block(after: str, lang: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(re.escape(after) + r".*?```" + lang + r"\n(.*?)```", text, flags=re.S)
    assert m, f"no ```{lang} block after {after!r} in {DOC}"
    return m.group(1)


@pytest.fixture
def affine_worker(redis_url: str) -> Iterator[None]:
    w = start_fake_worker(redis_url, "affine", "affine")
    yield
    w.stop()


def test_redis_cli_example(redis_url: str, affine_worker: None) -> None:
    if not shutil.which("redis-cli"):
        pytest.skip("redis-cli not on PATH")
    script = _block("<!-- redis-cli-example:start -->", "bash")
    proc = subprocess.run(["bash", "-c", script], env={**os.environ, "HEADRACE_REDIS_URL": redis_url},
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    r = redis.Redis.from_url(redis_url)
    [[_, entries]] = r.xread({"headrace:{affine}:reply:cli": "0-0"}, block=5000)
    res = P.decode_result(entries[0][1])
    assert res.request_id == "cli-req-1" and res.ok
    np.testing.assert_array_equal(res.outputs["y"], np.array([3, 5, 7, 9], np.float32))
    assert b"cli-req-1" in proc.stdout  # the XREAD in the example printed the result


def test_python_without_sdk_example(redis_url: str, affine_worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _block("### Python without the SDK", "python").replace("redis://127.0.0.1:6379/0", redis_url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})  # noqa: S102 - our own documentation's example
    assert out.getvalue().strip() == "b'ok' [3. 5. 7. 9.]"
