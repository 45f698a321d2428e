"""The CLI against a real Redis, given what an operator mistypes: a clean ``Error:`` line,
a non-zero exit, and nothing done half-way."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from headrace.client.keys import ModelKeys
from headrace.cluster.cli.main import main
from headrace.workers.pipeline import ops

pytestmark = pytest.mark.timeout(60)
NS = "clibad"


def _dead_letter(r: redis.Redis, keys: ModelKeys, rid: str) -> str:
    """A complete dead letter as the commit script writes one (fields of the entry + dlq_*)."""
    dlq_id = r.xadd(keys.dlq, {"id": rid, "reply_to": f"{NS}:replies:x", ops.DLQ_REASON: "provoked",
                               ops.DLQ_CODE: "model_error", ops.DLQ_DELIVERIES: "3"})
    return dlq_id.decode() if isinstance(dlq_id, bytes) else str(dlq_id)


def _cli(redis_url: str, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", NS, *args])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


@pytest.fixture
def dead(redis_url: str) -> tuple[redis.Redis, ModelKeys, str]:
    """A Redis client, the affine model's keys and the id of one complete dead letter."""
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys(NS, "affine")
    return r, keys, _dead_letter(r, keys, "r1")


def test_a_malformed_dlq_id_is_refused_before_anything_is_replayed(redis_url: str,
                                                                   dead: tuple[redis.Redis, ModelKeys, str]) -> None:
    r, keys, good = dead
    code, out = _cli(redis_url, "dlq", "replay", "affine", "--id", good, "--id", "17x")
    assert code == 1, out
    assert "'17x' is not a dead letter id" in out and "headrace dlq list" in out
    assert "Traceback" not in out and "Invalid stream ID" not in out
    assert r.xlen(keys.dlq) == 1 and not r.exists(keys.requests), "the good id was replayed before the bad one"
    code, out = _cli(redis_url, "dlq", "replay", "affine", "--id", good)
    assert code == 0 and "replayed 1" in out
    assert r.xlen(keys.dlq) == 0 and r.xlen(keys.requests) == 1


def test_replaying_ids_that_are_not_in_the_dlq_fails_and_says_so(redis_url: str,
                                                                  dead: tuple[redis.Redis, ModelKeys, str]) -> None:
    r, keys, good = dead
    code, out = _cli(redis_url, "dlq", "replay", "affine", "--id", good, "--id", "0-0")
    assert code == 1, out
    assert "replayed 1" in out and "1 of the 2 ids named were not replayed" in out
    assert r.xlen(keys.requests) == 1


@pytest.mark.parametrize("args", [["dlq", "list", "affine", "--count", "0"],
                                  ["dlq", "list", "affine", "--count", "-1"],
                                  ["status", "--window-s", "-5"],
                                  ["status", "--window-s", "0"],
                                  ["status", "--watch", "--interval-s", "0"]])
def test_counts_and_intervals_that_cannot_mean_anything_are_usage_errors(redis_url: str, args: list[str]) -> None:
    code, out = _cli(redis_url, *args)
    assert code == 2 and "Invalid value for" in out, out


def test_a_texts_file_that_is_not_utf8_is_a_clean_error_naming_the_line(redis_url: str, tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("first\nsecond\ncaf\u00e9\n".encode("latin-1"))
    code, out = _cli(redis_url, "submit", "length", "--texts", str(f))
    assert code == 1, out
    assert "[bad_value]" in out and "not UTF-8" in out and "line 3" in out and "Traceback" not in out
    assert not redis.Redis.from_url(redis_url).keys(f"{NS}:*"), "something was sent before the file was read"


@pytest.mark.parametrize("args", [["dlq", "list", "bad model"], ["status", "--model", "bad/model"]])
def test_a_bad_model_argument_is_named_as_the_argument_it_is(redis_url: str, args: list[str]) -> None:
    code, out = _cli(redis_url, *args)
    assert code == 1 and "[config_error] model name" in out, out
    assert "HEADRACE_MODEL" not in out, "an argument was blamed on an environment variable"


def test_a_bad_namespace_from_the_environment_is_blamed_on_the_variable(redis_url: str) -> None:
    res = CliRunner().invoke(main, ["--redis-url", redis_url, "status"], env={"HEADRACE_NAMESPACE": "a:b"})
    assert res.exit_code == 1 and "set by the environment variable HEADRACE_NAMESPACE" in res.output, res.output
    res = CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", "a:b", "status"])
    assert res.exit_code == 1 and "set by the argument namespace" in res.output, res.output
