"""ONNX / torch servables built from repository manifests, and load_servable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request
from headrace.models.builtin.build import MINILM_TORCH_NAME, ensure_minilm
from headrace.models.builtin.minilm import encode_batch, load_minilm, load_tokenizer
from headrace.models.repository.store import IOSpec, Manifest, ModelRepository
from headrace.workers.backends import load_servable
from headrace.workers.backends.base import runs_stacked
from headrace.workers.backends.onnx import choose_providers
from headrace.workers.backends.torch_backend import resolve_factory
from headrace.workers.settings import WorkerSettings


def req(i: int, text: str | None = None, **inputs: np.ndarray) -> Request:
    return Request(Envelope(f"r{i}", "reply"), inputs=inputs, text=text)


def save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def affine_graph() -> onnx.GraphProto:
    """y = x * 2 + [1, 2, 3] on x float32 [batch, 3]."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])]
    return helper.make_graph(nodes, "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [two, bias])


def rowsum_graph() -> onnx.GraphProto:
    """s = sum(x, axis=1, keepdims) on x float32 [batch, n] with n dynamic; r = Reshape(x, [-1, 3])
    summed, which fails at run time unless n is a multiple of 3."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
             helper.make_node("Reshape", ["x", "shape"], ["r3"]),
             helper.make_node("ReduceSum", ["r3", "axes"], ["r"], keepdims=1)]
    return helper.make_graph(nodes, "rowsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                             [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1]),
                              helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, 1])], [axes, shape])


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    r = ModelRepository(tmp_path / "repo")
    a = save(affine_graph(), tmp_path / "affine.onnx")
    r.add("affine", {"model.onnx": a}, format="onnx", inputs=[IOSpec("x", "float32", (3,))],
          outputs=[IOSpec("y", "float32", (3,))])
    r.add("affine-soft", {"model.onnx": a}, format="onnx", inputs=[IOSpec("x", "float32", (3,))],
          outputs=[IOSpec("y", "float32", (3,))], postprocess="softmax", max_batch=2)
    rs = save(rowsum_graph(), tmp_path / "rowsum.onnx")
    r.add("rowsum", {"model.onnx": rs}, format="onnx", inputs=[IOSpec("x", "float32", (-1,))],
          outputs=[IOSpec("s", "float32", (1,))])
    return r


def settings(repo: ModelRepository, model: str, **kw) -> WorkerSettings:  # type: ignore[no-untyped-def]
    return WorkerSettings(model=model, model_repo=str(repo.root), **kw)


def test_generic_onnx_tensor_model(repo: ModelRepository) -> None:
    s = load_servable(settings(repo, "affine", intra_op_threads=1))
    assert not s.accepts_text and s.version == "1"
    assert [(t.name, t.dtype, t.shape) for t in s.inputs] == [("x", "float32", (3,))]
    xs = [np.array([i, i + 1, i + 2], dtype=np.float32) for i in range(5)]
    requests = [req(i, x=x) for i, x in enumerate(xs)]
    for r in requests:
        s.check(r)
    out = s.infer(requests)
    assert len(out) == 5
    for x, o in zip(xs, out, strict=True):
        np.testing.assert_allclose(o["y"], x * 2 + np.array([1, 2, 3], dtype=np.float32))
        assert o["y"].dtype == np.float32 and o["y"].shape == (3,)
    assert s.describe()["providers"] == ["CPUExecutionProvider"]
    s.close()


def test_postprocess_and_max_batch_chunks(repo: ModelRepository) -> None:
    s = load_servable(settings(repo, "affine-soft"))
    xs = [np.array([0, i, -i], dtype=np.float32) for i in range(5)]
    out = s.infer([req(i, x=x) for i, x in enumerate(xs)])  # 5 requests, max_batch 2 -> 3 runs
    for x, o in zip(xs, out, strict=True):
        z = x * 2 + np.array([1, 2, 3], dtype=np.float32)
        ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(o["y"], ref, rtol=1e-5)


def test_dynamic_axis_requests_grouped_by_shape(repo: ModelRepository) -> None:
    s = load_servable(settings(repo, "rowsum"))
    xs = [np.arange(n, dtype=np.float32) for n in (3, 6, 3, 9, 6)]
    out = s.infer([req(i, x=x) for i, x in enumerate(xs)])
    assert [float(o["s"][0]) for o in out] == [float(x.sum()) for x in xs]


def test_runtime_failure_is_model_error(repo: ModelRepository) -> None:
    s = load_servable(settings(repo, "rowsum"))
    bad = req(0, x=np.arange(4, dtype=np.float32))  # valid per signature, Reshape(-1, 3) fails
    s.check(bad)
    with pytest.raises(E.ModelError):
        s.infer([bad])
    assert s.infer([req(1, x=np.arange(3, dtype=np.float32))])[0]["s"][0] == 3.0  # still serving


@pytest.mark.parametrize(("request_", "code"), [
    (req(0, x=np.zeros(3, dtype=np.float64)), E.BAD_DTYPE),
    (req(0, x=np.zeros(4, dtype=np.float32)), E.BAD_SHAPE),
    (req(0, x=np.zeros((1, 3), dtype=np.float32)), E.BAD_SHAPE),
    (req(0, x=np.array([0, np.nan, 1], dtype=np.float32)), E.BAD_VALUE),
    (req(0, x=np.array([0, np.inf, 1], dtype=np.float32)), E.BAD_VALUE),
    (req(0, text="hello"), E.BAD_VALUE),                    # text to a tensor model
    (req(0, z=np.zeros(3, dtype=np.float32)), E.BAD_VALUE),  # an input the model does not have
])
def test_check_codes(repo: ModelRepository, request_: Request, code: str) -> None:
    s = load_servable(settings(repo, "affine"))
    with pytest.raises(E.ProtocolError) as info:
        s.check(request_)
    assert info.value.code == code


def test_non_finite_allowed_when_configured(repo: ModelRepository) -> None:
    s = load_servable(settings(repo, "affine", reject_non_finite=False))
    s.check(req(0, x=np.array([0, np.nan, 1], dtype=np.float32)))


def test_hand_written_manifest_is_servable(tmp_path: Path) -> None:
    """A user's folder with model.onnx + manifest.json, no headrace code involved."""
    folder = tmp_path / "repo" / "user-model" / "3"
    folder.mkdir(parents=True)
    data = save(affine_graph(), folder / "model.onnx").read_bytes()
    (folder / "manifest.json").write_text(json.dumps({
        "name": "user-model", "version": "3", "format": "onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [3]}],
        "files": [{"path": "model.onnx", "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}],
    }))
    s = load_servable(WorkerSettings(model="user-model", model_repo=str(tmp_path / "repo")))
    assert s.version == "3"
    out = s.infer([req(0, x=np.ones(3, dtype=np.float32))])
    np.testing.assert_allclose(out[0]["y"], [3.0, 4.0, 5.0])


def test_tampered_file_refused(repo: ModelRepository) -> None:
    p = repo.path("affine", 1) / "model.onnx"
    p.write_bytes(p.read_bytes().replace(b"affine", b"afFine"))
    with pytest.raises(E.RepositoryError, match="checksum"):
        load_servable(settings(repo, "affine"))


def test_not_found(repo: ModelRepository, tmp_path: Path) -> None:
    with pytest.raises(E.ModelNotFoundError):
        load_servable(settings(repo, "nope"))
    with pytest.raises(E.ModelNotFoundError):
        load_servable(settings(repo, "affine", version="2"))
    with pytest.raises(E.ModelNotFoundError):
        load_servable(settings(repo, "affine", backend="torch"))
    with pytest.raises(E.ModelNotFoundError):
        load_servable(WorkerSettings(model="affine", model_repo=str(tmp_path / "absent")))
    with pytest.raises(E.ModelError):
        load_servable(settings(repo, "affine", version="1", backend="torch"))


def test_choose_providers() -> None:
    avail = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(avail) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(avail, ["CUDAExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(E.ConfigError):
        choose_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider"])


def test_torch_factory_must_be_inside_headrace() -> None:
    base = {"name": "t", "version": "1", "format": "torch", "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}]}
    with pytest.raises(E.ModelError, match="headrace package"):
        resolve_factory(Manifest.from_dict({**base, "extra": {"torch_factory": "os:system"}}))
    with pytest.raises(E.ModelError):
        resolve_factory(Manifest.from_dict(base))
    assert callable(resolve_factory(Manifest.from_dict({**base, "extra": {"arch": "minilm"}})))


# --- the real MiniLM, both formats (built once per session into the shared test repo) ---------------


@pytest.fixture(scope="session")
def minilm_repo(model_repo_dir: Path) -> ModelRepository:
    ensure_minilm(model_repo_dir)
    ensure_minilm(model_repo_dir, torch_format=True)
    return ModelRepository(model_repo_dir)


TEXTS = ["The cat sat on the mat.", "Redis Streams keep entries until they are acknowledged.", "hi"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("model", ["minilm", MINILM_TORCH_NAME])
def test_minilm_servables_match_torch(minilm_repo: ModelRepository, model: str) -> None:
    s = load_servable(WorkerSettings(model=model, model_repo=str(minilm_repo.root), intra_op_threads=1))
    assert s.accepts_text
    requests = [req(i, text=t) for i, t in enumerate(TEXTS)]
    for r in requests:
        s.check(r)
    with pytest.raises(E.ProtocolError) as info:  # tensors to a text model
        s.check(req(9, x=np.zeros(3, dtype=np.float32)))
    assert info.value.code == E.BAD_VALUE
    assert s.length(requests[2]) == 3  # [CLS] hi [SEP]
    out = s.infer(requests)
    tok = load_tokenizer()
    ids, mask = encode_batch(tok, TEXTS)
    with torch.inference_mode():
        ref = load_minilm()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    got = np.stack([o["embeddings"] for o in out])
    assert got.shape == (3, 384) and got.dtype == np.float32
    assert float(((got * ref).sum(axis=1)).min()) > 0.9999
    # A request's embedding does not depend on what it was batched with.
    alone = s.infer([requests[2]])[0]["embeddings"]
    np.testing.assert_allclose(alone, got[2], atol=1e-5)
    # Texts as rows (a multi-sample text entry carried as a block): the same embeddings.
    assert runs_stacked(s) and s.text_lengths(TEXTS)[2] == 3
    rows = s.infer_texts(TEXTS, ["a", "b", "c"])["embeddings"]
    np.testing.assert_allclose(rows, got, atol=1e-5)


def test_ensure_minilm_reuses_identical_build(minilm_repo: ModelRepository) -> None:
    before = minilm_repo.versions("minilm")
    m = ensure_minilm(minilm_repo.root)
    assert minilm_repo.versions("minilm") == before and m.version == before[-1]
    assert m.preprocess == "bert_tokenizer" and m.extra["max_length"] == 256
    assert {f.path for f in m.files} == {"model.onnx", "tokenizer.json"}
    assert m.recipe[0]["params"]["exporter"] == "torchscript"
    assert m.measured["fidelity"]["min_cosine"] > 0.9999


def test_text_encoder_tokenises_each_text_once() -> None:
    """The ids kept by ``count`` (admission) build the same padded batch the tokenizer's
    own batch padding gives, ``encode`` tokenises only what was never counted (or was
    evicted), a text twice in a batch or counted again before its batch ran is tokenised
    once, and the ids are gone once their batch was encoded."""
    from headrace.models.builtin.minilm import default_model_path
    from headrace.workers.backends.tokens import TextEncoder

    texts = ["short", "a somewhat longer sentence with more tokens in it", "", "short", "x " * 400]
    enc = TextEncoder(default_model_path(), 256, cache_size=3)
    ref_ids, ref_mask = encode_batch(load_tokenizer(), texts)
    calls: list[int] = []
    real = enc._tokenise
    enc._tokenise = lambda batch: calls.append(len(batch)) or real(batch)  # type: ignore[method-assign]
    counts = [enc.count(t) for t in texts]  # cache of 3: the first texts are evicted again
    assert counts == [int(m.sum()) for m in ref_mask] and max(counts) == 256
    assert calls == [1, 1, 1, 1], "the second 'short' came from the cache"
    calls.clear()
    ids, mask = enc.encode(texts)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert calls == [1]  # only "a somewhat longer..." (evicted); both "short" from the kept ids
    ids2, _ = enc.encode(texts[:2])  # their ids were taken by the batch above: tokenised again
    np.testing.assert_array_equal(ids2, encode_batch(load_tokenizer(), texts[:2])[0])
    assert calls == [1, 2]
    calls.clear()
    assert enc.count_batch(["fresh", "fresh", "short"]) == [3, 3, 3] and calls == [2], "each new text once"
