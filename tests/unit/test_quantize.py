"""Quantization: real MiniLM fidelity gate, static QDQ, node selection, mixed precision, fp16."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest

from headrace.client.errors import ConfigError, ModelError
from headrace.models.builtin import digits as DG
from headrace.models.compress import quantize as Q
from headrace.models.compress.fidelity import INT8_MIN_MEAN_COSINE, INT8_MIN_OVERLAP_AT_10, embedding_fidelity

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def op_counts(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DG.DigitsData]:
    data = DG.load_data()
    model, _ = DG.train(data, epochs=20)
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    DG.export(model, path)
    return path, data


def accuracy(path: Path, data: DG.DigitsData) -> float:
    return float((DG.onnx_logits(path, data.x_test).argmax(1) == data.y_test).mean())


@pytest.mark.timeout(240)
def test_dynamic_int8_minilm_meets_fidelity_gate(model_repo_dir: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2, per-channel dynamic INT8, on 64 held-out real sentences."""
    from headrace.models.builtin.build import ensure_minilm
    from headrace.models.builtin.corpus import load_corpus, sample
    from headrace.models.compress.report import ort_runner
    from headrace.models.repository.store import ModelRepository
    from headrace.models.tokenizer import encode_batch, load_tokenizer

    m = ensure_minilm(model_repo_dir)
    fp32 = ModelRepository(model_repo_dir).file_path(m, m.model_file)
    int8 = Q.quantize_dynamic_int8(fp32, tmp_path / "int8.onnx", per_channel=True)
    ops = op_counts(int8)
    assert ops["QAttention"] == 6 and ops["MatMulInteger"] == 18  # every weight-bearing node quantized
    assert int8.stat().st_size < fp32.stat().st_size / 3.5  # the embedding table is int8 too

    tok = load_tokenizer()
    sents = sample(load_corpus(("pydoc",)).held_out, 64, seed=0)
    feeds = [dict(zip(("input_ids", "attention_mask"), encode_batch(tok, sents[i:i + 16]), strict=True))
             for i in range(0, 64, 16)]
    ref_run, q_run = ort_runner(fp32, 1), ort_runner(int8, 1)
    ref = np.concatenate([ref_run(f) for f in feeds])
    got = np.concatenate([q_run(f) for f in feeds])
    f = embedding_fidelity(ref, got)
    assert f.mean_cosine >= INT8_MIN_MEAN_COSINE, f
    assert f.overlap_at_k >= INT8_MIN_OVERLAP_AT_10, f
    assert f.min_cosine > 0.95, f


def test_static_qdq_calibrated_digits(digits_onnx: tuple[Path, DG.DigitsData], tmp_path: Path) -> None:
    path, data = digits_onnx
    cal = [{"image": data.x_train[i:i + 64]} for i in range(0, 256, 64)]
    cache = tmp_path / "cal.json"
    out = Q.quantize_static_int8(path, tmp_path / "qdq.onnx", cal, cache_path=cache)
    ops = op_counts(out)
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 6
    assert cache.is_file() and cache.read_text().lstrip().startswith("{")  # JSON, not pickle
    assert accuracy(out, data) >= accuracy(path, data) - 0.02
    # The cache is reused: calibration data that would give other ranges changes nothing.
    out2 = Q.quantize_static_int8(path, tmp_path / "qdq2.onnx", [{"image": data.x_train[:4] * 0}], cache_path=cache)
    assert out2.read_bytes() == out.read_bytes()


def test_exclusions_and_selection_follow_node_names(digits_onnx: tuple[Path, DG.DigitsData], tmp_path: Path) -> None:
    path, data = digits_onnx
    nodes = Q.weight_nodes(path)
    assert [n.op_type for n in nodes] == ["Gemm", "Gemm", "Gemm"]
    assert [n.params for n in nodes] == [64 * 256, 256 * 128, 128 * 10]
    excl = Q.quantize_dynamic_int8(path, tmp_path / "excl.onnx", nodes_to_exclude=[nodes[0].name])
    assert op_counts(excl)["MatMulInteger"] == 2 and op_counts(excl)["MatMul"] == 1
    only = Q.quantize_dynamic_int8(path, tmp_path / "only.onnx", nodes_to_quantize=[nodes[2].name])
    assert op_counts(only)["MatMulInteger"] == 1
    full = Q.quantize_dynamic_int8(path, tmp_path / "full.onnx")
    assert op_counts(full)["MatMulInteger"] == 3
    assert accuracy(full, data) >= accuracy(path, data) - 0.02


def _fake(sensitivity: dict[str, float], base: float = 1.0) -> tuple[Q.QuantizeFn, Q.ScoreFn, list[str]]:
    """A model whose score is base minus the sensitivity of every quantized node (additive)."""
    quantized: list[str] = []

    def quantize(src: Path, dst: Path, nq: object, ne: object) -> None:
        chosen = list(nq) if nq else [n for n in sensitivity if n not in list(ne)]  # type: ignore[call-overload]
        quantized[:] = chosen
        dst.write_text(",".join(chosen))

    def score(path: Path) -> float:
        if path.suffix == ".onnx" and path.name == "src.onnx":
            return base
        names = [n for n in path.read_text().split(",") if n]
        return base - sum(sensitivity[n] for n in names)

    return quantize, score, quantized


def test_mixed_precision_keeps_fewest_sensitive_nodes(tmp_path: Path) -> None:
    sens = {"a": 0.001, "b": 0.02, "c": 0.0005, "d": 0.01, "e": 0.002}
    quantize, score, _ = _fake(sens)
    src = tmp_path / "src.onnx"
    src.write_text("")
    nodes = [Q.WeightNode(n, "MatMul", f"w{n}", 10) for n in sens]
    r = Q.mixed_precision(src, tmp_path / "out.onnx", quantize, score, 0.985, nodes=nodes, progress=False)
    # Ranked b (0.02), d (0.01), e, a, c: keeping b alone gives 0.9965 >= 0.985.
    assert r.met and r.excluded == ("b",)
    assert [s.node for s in r.sensitivities] == ["b", "d", "e", "a", "c"]
    assert r.score == pytest.approx(1 - 0.0135)
    assert (tmp_path / "out.onnx").read_text().split(",") == ["a", "c", "d", "e"]  # file on disk = the choice
    r2 = Q.mixed_precision(src, tmp_path / "out2.onnx", quantize, score, 0.999, nodes=nodes, progress=False)
    assert r2.met and r2.excluded == ("b", "d", "e", "a")
    r3 = Q.mixed_precision(src, tmp_path / "out3.onnx", quantize, score, 0.9, nodes=nodes, progress=False)
    assert r3.met and r3.excluded == () and r3.sensitivities == ()  # no scan needed
    r4 = Q.mixed_precision(src, tmp_path / "out4.onnx", quantize, score, 1.5, nodes=nodes, progress=False)
    assert not r4.met and len(r4.excluded) == 5


def test_fp16_keeps_io_fp32(digits_onnx: tuple[Path, DG.DigitsData], tmp_path: Path) -> None:
    path, data = digits_onnx
    out = Q.convert_fp16(path, tmp_path / "fp16.onnx")
    g = onnx.load(str(out)).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in g.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert out.stat().st_size < path.stat().st_size * 0.6
    assert accuracy(out, data) >= accuracy(path, data) - 0.01


def test_text_feeds_and_reader() -> None:
    from headrace.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    sents = ["A short one.", "A considerably longer sentence that has many more word pieces in it.", "Mid size here."]
    feeds = Q.text_feeds(tok, sents, ["input_ids", "attention_mask"], batch_size=2, same_length=True)
    assert len(feeds) == 2 and feeds[0]["input_ids"].shape[1] == feeds[1]["input_ids"].shape[1]
    assert feeds[1]["attention_mask"].sum() == len(tok.encode(sents[2]).ids)
    reader = Q.FeedsCalibrationReader(feeds)
    assert [reader.get_next() is not None for _ in range(3)] == [True, True, False]
    reader.rewind()
    assert reader.get_next() is not None and len(reader) == 2
    with pytest.raises(ConfigError):
        Q.text_feeds(tok, sents, ["pixel_values"])
    with pytest.raises(ConfigError):
        Q.FeedsCalibrationReader([])


def test_errors(digits_onnx: tuple[Path, DG.DigitsData], tmp_path: Path) -> None:
    path, _ = digits_onnx
    with pytest.raises(ModelError, match="no ONNX model"):
        Q.quantize_dynamic_int8(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="must differ"):
        Q.quantize_dynamic_int8(path, path)
    with pytest.raises(ConfigError, match="calibration method"):
        Q.quantize_static_int8(path, tmp_path / "x.onnx", [{"image": np.zeros((1, 64), np.float32)}], method="magic")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError):
        Q.weight_nodes(bad)


def test_reduce_range_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's u8 x s8 kernels saturate on x86 without VNNI: 7-bit weights there, 8-bit elsewhere."""
    import platform

    from headrace.models.compress import quantize as Q

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert Q.cpu_needs_reduce_range("flags\t\t: fpu sse2 avx avx2 fma")
    assert not Q.cpu_needs_reduce_range("flags\t\t: fpu avx2 avx512f avx512_vnni")
    assert not Q.cpu_needs_reduce_range("flags\t\t: fpu avx2 avx_vnni")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not Q.cpu_needs_reduce_range("Features\t: fp asimd")
