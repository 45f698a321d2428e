"""The headrace CLI without services: every --help, option wiring, input files, rendering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.client.config import redact_url as _redact
from headrace.cluster.cli import context as cli_mod
from headrace.cluster.cli.main import main
from headrace.cluster.cli.render import dlq_table, load_inputs, result_json, result_table, status_table
from headrace.cluster.demo import DEMO_SENTENCES, pick_sentences, similarity_report

pytestmark = pytest.mark.timeout(30)

CORE_COMMANDS = {"worker", "redis", "submit", "status", "dlq", "models", "compress", "demo"}


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            out += _all_commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def _render(renderable: Any) -> str:
    console = Console(width=200, record=True)
    with console.capture() as cap:
        console.print(renderable)
    return cap.get()


def test_core_commands_exist() -> None:
    names = set(main.list_commands(click.Context(main)))
    assert CORE_COMMANDS <= names
    dlq = main.get_command(click.Context(main), "dlq")
    models = main.get_command(click.Context(main), "models")
    assert isinstance(dlq, click.Group) and isinstance(models, click.Group)
    assert {"list", "replay", "purge"} <= set(dlq.list_commands(click.Context(dlq)))
    assert {"list", "show"} <= set(models.list_commands(click.Context(models)))


@pytest.mark.parametrize("path", _all_commands(main), ids=lambda p: " ".join(p) or "headrace")
def test_help_of_every_command(path: tuple[str, ...]) -> None:
    res = CliRunner().invoke(main, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "--help" in res.output


def test_cli_module_imports_light() -> None:
    code = ("import sys, headrace.cluster.cli.main; "
            "print([m for m in ('ray', 'torch', 'onnxruntime') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_worker_wires_options_and_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    import headrace.workers.run as run_mod

    calls: list[tuple[Any, Any]] = []
    monkeypatch.setattr(run_mod, "run_standalone", lambda s, servable=None: calls.append((s, servable)))
    res = CliRunner().invoke(main, ["--redis-url", "redis://u:pw@h:1/0", "--namespace", "ns", "--repo", "/r",
                                    "worker", "--fake", "affine", "--max-batch", "8", "--lease-s", "3",
                                    "--max-wait-ms", "2.5", "--consumer", "c1"], env={"HEADRACE_MODEL": ""})
    assert res.exit_code == 0, res.output
    settings, servable = calls[0]
    assert (settings.model, settings.max_batch, settings.lease_s, settings.max_wait_ms) == ("affine", 8, 3.0, 2.5)
    assert (settings.redis_url, settings.namespace, settings.model_repo, settings.consumer) == (
        "redis://u:pw@h:1/0", "ns", "/r", "c1")
    assert servable is not None and servable.name == "affine"
    assert "pw" not in res.output  # the password is redacted when printed

    calls.clear()
    res = CliRunner().invoke(main, ["worker", "--model", "minilm", "--version", "2", "--backend", "onnx"])
    assert res.exit_code == 0, res.output
    settings, servable = calls[0]
    assert (settings.model, settings.version, settings.backend, servable) == ("minilm", "2", "onnx", None)


def test_headrace_errors_become_clean_messages() -> None:
    res = CliRunner().invoke(main, ["--namespace", "bad:ns", "status"])
    assert res.exit_code == 1
    assert "Error: [config_error]" in res.output and "namespace" in res.output
    assert "Traceback" not in res.output


def test_submit_needs_text_or_input() -> None:
    res = CliRunner().invoke(main, ["submit", "affine"])
    assert res.exit_code == 2 and "exactly one of --text, --input or --texts" in res.output


def test_status_renders_model_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.cluster.cli import status_data as cli_status
    from headrace.workers.admin.status import ConsumerInfo, ModelStatus

    st = ModelStatus(model="affine", stream_length=12, lag=3, pending=2,
                     consumers=(ConsumerInfo("w1", 2, 10), ConsumerInfo("w2", 0, 5)), dead_letters=1,
                     throughput_rps=41.5, p50_ms=1.25, p99_ms=9.75, workers=("w1", "w2"), window_s=60.0)
    seen: list[Any] = []

    def fake_collect(r: Any, ns: str, models: list[str], window_s: float) -> list[tuple[str, Any]]:
        seen.append((ns, models, window_s))
        return [("affine", st)]

    monkeypatch.setattr(cli_status, "collect_status", fake_collect)
    res = CliRunner().invoke(main, ["--namespace", "ns1", "status", "--model", "affine", "--window-s", "30"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert seen == [("ns1", ["affine"], 30.0)]
    row = next(line for line in res.output.splitlines() if "affine" in line).split()
    assert row == ["affine", "12", "3", "2", "2", "2", "1", "41.5", "1.2", "9.8"]


def test_status_table_without_data_and_empty() -> None:
    from headrace.workers.admin.status import ModelStatus

    st = ModelStatus(model="m", stream_length=0, lag=0, pending=0, consumers=(), dead_letters=0,
                     throughput_rps=0.0, p50_ms=None, p99_ms=None, workers=(), window_s=60.0)
    text = _render(status_table([("m", st)], "ns"))
    assert "m" in text and "-" in text
    assert "no models" in _render(status_table([], "ns"))


def test_status_table_shows_the_samples_multi_sample_entries_carry() -> None:
    from headrace.workers.admin.status import ModelStatus

    st = ModelStatus(model="m", stream_length=40, lag=12, pending=3, consumers=(), dead_letters=0,
                     throughput_rps=0.0, p50_ms=None, p99_ms=None, workers=(), window_s=60.0, samples_per_entry=31.6)
    assert "12 ×32" in _render(status_table([("m", st)], "ns"))


def test_dlq_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    import headrace.workers.admin.dlq as dlq_mod

    letter = dlq_mod.DeadLetter(dlq_id="5-0", request_id="r1", reply_to="x", reason="poison", code=E.MAX_DELIVERIES,
                                entry_id="1-0", deliveries=4, ts_ms=1_700_000_000_000)
    monkeypatch.setattr(dlq_mod, "dlq_list", lambda r, ns, m, count: [letter][:count])
    monkeypatch.setattr(dlq_mod, "dlq_replay", lambda r, ns, m, ids=None: len(ids or [1, 2]))
    monkeypatch.setattr(dlq_mod, "dlq_purge", lambda r, ns, m: 3)
    runner = CliRunner()
    out = runner.invoke(main, ["dlq", "list", "affine"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "r1" in out.output and "max_deliveries_exceeded" in out.output
    assert "2023-11-14" in out.output
    out = runner.invoke(main, ["dlq", "replay", "affine", "--id", "5-0"])
    assert out.exit_code == 0 and "replayed 1" in out.output
    out = runner.invoke(main, ["dlq", "purge", "affine"], input="n\n")
    assert out.exit_code == 1 and "Aborted" in out.output
    out = runner.invoke(main, ["dlq", "purge", "affine", "--yes"])
    assert out.exit_code == 0 and "purged 3" in out.output
    assert "(empty)" in _render(dlq_table([], "m"))


def test_compress_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import fields

    from headrace.cluster.cli import compress as cli_compress
    from headrace.models.compress import pipeline

    recipe_fields = {f.name for f in fields(pipeline.CompressOptions)}
    cmd = main.get_command(click.Context(main), "compress")
    assert cmd is not None
    # every recipe option is a real CompressOptions field
    assert set(cli_compress.RECIPE_FIELDS.values()) | set(cli_compress.SHARED_FIELDS) <= recipe_fields
    calls: list[Any] = []
    monkeypatch.setattr(pipeline, "compress_main", lambda opts: calls.append(opts))
    res = CliRunner().invoke(main, ["--repo", "/tmp/r", "compress", "digits", "--steps", "export,prune",
                                    "--distill-steps", "5", "--no-bench", "--prune-ffn", "0.5"])
    assert res.exit_code == 0, res.output
    assert calls == [pipeline.CompressOptions(model="digits", repo=Path("/tmp/r"), steps=("export", "prune"),
                                              distill_steps=5, bench=False, prune_ffn=0.5)]


def test_models_list_on_an_empty_repository(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["--repo", str(tmp_path), "models", "list"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["--repo", str(tmp_path), "models", "show", "nope"])
    assert res.exit_code == 1 and "unknown_model" in res.output


def test_load_inputs_from_files(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(4, dtype=np.float32))
    np.save(tmp_path / "other.npy", np.ones((2, 2), np.int64))
    np.savez(tmp_path / "pair.npz", a=np.zeros(3, np.float16), b=np.array([1, 2], np.int32))
    (tmp_path / "in.json").write_text(json.dumps({"x": [1, 2, 3, 4],
                                                  "ids": {"dtype": "int64", "data": [1, 2, 3, 4], "shape": [2, 2]}}))
    got = load_inputs([str(tmp_path / "x.npy"), f"mask={tmp_path / 'other.npy'}", str(tmp_path / "pair.npz")])
    assert set(got) == {"x", "mask", "a", "b"}
    assert got["x"].dtype == np.float32 and got["mask"].shape == (2, 2) and got["a"].dtype == np.float16
    js = load_inputs([str(tmp_path / "in.json")])
    assert js["x"].dtype == np.float32 and js["ids"].dtype == np.int64 and js["ids"].shape == (2, 2)
    for bad in ("nope.npy", str(tmp_path / "in.txt")):
        with pytest.raises(E.ProtocolError):
            load_inputs([bad])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(E.ProtocolError):
        load_inputs([str(tmp_path / "list.json")])


def test_result_rendering() -> None:
    res = P.Result(request_id="r1", status=P.STATUS_OK, outputs={"y": np.arange(10, dtype=np.float32)},
                   timings=P.Timings(queue_ms=1.5, infer_ms=2.0, batch_size=4, worker="w"), model="affine",
                   version="1")
    text = _render(result_table(res))
    assert "r1" in text and "float32" in text and "[10]" in text and "batch 4" in text and "…" in text
    doc = result_json(res)
    assert doc["outputs"]["y"]["data"] == list(range(10)) and json.dumps(doc)
    err = P.error_result("r2", E.BAD_SHAPE, "wrong")
    assert "bad_shape" in _render(result_table(err))


def test_redact() -> None:
    assert _redact("redis://alice:s3cret@h:6379/0") == "redis://alice:***@h:6379/0"
    assert _redact("redis://:s3cret@h:6379/0") == "redis://***@h:6379/0"
    assert _redact("redis://h:6379/0") == "redis://h:6379/0"


def test_demo_sentences_and_similarity_report() -> None:
    picked = pick_sentences(16)
    assert len(picked) == 16 and len({t for t, _ in picked}) == 8  # round-robin over topics
    assert len(pick_sentences(10_000)) == len(DEMO_SENTENCES)
    topics = ["a", "a", "b", "b"]
    emb = np.array([[1, 0.1], [1, 0], [0, 1], [0.1, 1]], np.float32)
    within, across, hit, sim = similarity_report(topics, emb)
    assert within > 0.99 and across < 0.2 and hit == 1.0 and sim.shape == (4, 4)


def test_cli_config_builds_client_settings() -> None:
    cfg = cli_mod.CliConfig(redis_url="redis://h:2/0", namespace="ns", repo="r")
    s = cfg.client_settings(timeout_s=3.0)
    assert (s.redis_url, s.namespace, s.timeout_s) == ("redis://h:2/0", "ns", 3.0) and cfg.ns == "ns"
