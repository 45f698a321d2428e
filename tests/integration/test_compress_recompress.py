"""Compressing an entry that is itself a compress product (an INT8 copy published with
``--publish version``, a QDQ or fp16 entry): the run goes back to the fp32 version it was
made from and says so, or refuses naming the version to pass; never "your fp32 model" for a
copy, never stacked quantization. Tiny models; no Redis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from headrace.client.errors import ConfigError
from headrace.models.compress.anymodel import AnyModelOptions, run_any
from headrace.models.compress.quantize import convert_fp16, quantize_static_int8
from headrace.models.compress.steps import QuantizeOptions
from headrace.models.repository.store import ModelRepository
from tests.support.compress import add_tiny_mlp, mlp_data


def _opts(tmp: Path, cal: Path, held: Path, **kw: object) -> AnyModelOptions:
    return AnyModelOptions(name="tiny", data=cal, held_out=held, steps=("quantize-dynamic",), repo=tmp / "repo",
                           work_dir=tmp / "work", bench=False, progress=False, threads=1, min_fidelity=0.5,
                           quantize=QuantizeOptions(mixed=False), **kw)  # type: ignore[arg-type]


@pytest.fixture
def published_twice(tmp_path: Path) -> tuple[ModelRepository, Path, Path]:
    """tiny/1 fp32, tiny/2 its INT8 copy (``--publish version``)."""
    repo = ModelRepository(tmp_path / "repo")
    add_tiny_mlp(repo, tmp_path)
    cal, held = mlp_data(tmp_path / "data", n=40)
    assert run_any(_opts(tmp_path, cal, held, publish="version")).published == ["tiny/2"]
    return repo, cal, held


def test_latest_int8_copy_is_traced_back_to_its_fp32_version(published_twice: tuple[ModelRepository, Path, Path],
                                                             tmp_path: Path) -> None:
    repo, cal, held = published_twice
    res = run_any(_opts(tmp_path, cal, held, publish="version"))
    assert res.published == ["tiny/3"]
    m3 = repo.load_manifest("tiny", "3")
    assert [s["step"] for s in m3.recipe].count("quantize-dynamic") == 1 and m3.source == "tiny/1"
    ref = res.evaluated[0]
    assert ref.candidate.label == "fp32 onnx" and "tiny/1" in ref.candidate.note
    report = json.loads((res.report_dir / "report.json").read_text())
    assert report["context"]["source"] == "tiny/1" and "tiny/2" in report["context"]["source_note"]


def test_cli_says_which_version_it_compressed(published_twice: tuple[ModelRepository, Path, Path],
                                              tmp_path: Path) -> None:
    from headrace.cluster.cli.main import main

    _, cal, held = published_twice
    out = CliRunner().invoke(main, ["--repo", str(tmp_path / "repo"), "compress", "tiny", "--data", str(cal),
                                   "--held-out", str(held), "--steps", "quantize-dynamic", "--publish", "none",
                                   "--no-bench", "--no-progress", "--no-mixed", "--threads", "1",
                                   "--min-fidelity", "0.5", "--work-dir", str(tmp_path / "work")])
    assert out.exit_code == 0, out.output
    flat = " ".join(out.output.split())
    assert "tiny/2 (the latest version) is int8 made from tiny/1: compressing tiny/1" in flat


def test_explicit_int8_version_is_refused_naming_the_version_to_pass(
        published_twice: tuple[ModelRepository, Path, Path], tmp_path: Path) -> None:
    _, cal, held = published_twice
    with pytest.raises(ConfigError, match=r"tiny/2 is int8 made from tiny/1; .*headrace compress tiny --version 1"):
        run_any(_opts(tmp_path, cal, held, version="2"))


@pytest.mark.parametrize("kind", ["qdq", "fp16"])
def test_quantized_graph_without_a_known_origin_is_refused(tmp_path: Path, kind: str) -> None:
    # added straight to the repository, declared fp32: only the graph shows what it is
    from tests.support.compress import tiny_mlp_onnx

    cal, held = mlp_data(tmp_path / "data", n=40)
    src = tiny_mlp_onnx(tmp_path / "fp32.onnx")
    if kind == "qdq":
        feeds = [{"x": np.load(cal)["x"][:16]}]
        made = quantize_static_int8(src, tmp_path / "m.onnx", feeds)
    else:
        made = convert_fp16(src, tmp_path / "m.onnx")
    from headrace.models.repository.manifest import IOSpec

    ModelRepository(tmp_path / "repo").add("tiny", {"model.onnx": made}, format="onnx", source="a colleague",
                                           inputs=[IOSpec("x", "float32", (16,))],
                                           outputs=[IOSpec("logits", "float32", (4,))])
    want = r"already quantized \(DequantizeLinear, QuantizeLinear nodes in its graph\)" if kind == "qdq" else \
        r"fp16 \(float16 tensors in its graph\)"
    with pytest.raises(ConfigError, match=f"tiny/1 is {want}, not an fp32 model"):
        run_any(_opts(tmp_path, cal, held))


def test_a_copy_published_under_its_own_name_points_at_the_entry_it_came_from(tmp_path: Path) -> None:
    # --publish name (and the built-in recipes) write NAME-int8 whose source is not NAME/VERSION:
    # the refusal names the fp32 entry of the same stem that is in the repository
    from headrace.models.repository.manifest import IOSpec
    from tests.support.compress import tiny_mlp_onnx

    cal, held = mlp_data(tmp_path / "data", n=40)
    src = tiny_mlp_onnx(tmp_path / "fp32.onnx")
    made = quantize_static_int8(src, tmp_path / "m.onnx", [{"x": np.load(cal)["x"][:16]}])
    repo = ModelRepository(tmp_path / "repo")
    spec = {"inputs": [IOSpec("x", "float32", (16,))], "outputs": [IOSpec("logits", "float32", (4,))]}
    repo.add("tiny", {"model.onnx": src}, format="onnx", source="a colleague", **spec)  # type: ignore[arg-type]
    repo.add("tiny-int8", {"model.onnx": made}, format="onnx", source="sklearn digits", precision="int8",
             **spec)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"tiny-int8/1 is int8, not an fp32 model; .*`headrace compress tiny`"):
        run_any(dataclasses.replace(_opts(tmp_path, cal, held), name="tiny-int8"))
