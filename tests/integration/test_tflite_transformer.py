"""A transformer through the TFLite export: onnx2tf on a BERT graph with symbolic
``[batch, sequence]`` inputs guesses layouts wrong (the attention context is transposed
before its reshape); frozen to static shapes first, the LiteRT file matches ONNX Runtime.

Two BERT-family graphs: Hugging Face ``BertModel`` (converted directly) and headrace's own
encoder as a repository entry, compressed with ``--steps tflite`` and served by a LiteRT
worker through Redis."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="the tf extra (ai-edge-litert) is not installed")
# find_spec, not importorskip: importing onnx2tf sets the process's recursion limit to 2**31-1
# (onnx2tf.py, at import), which would let every later test overflow the C stack on deep input.
if importlib.util.find_spec("onnx2tf") is None:
    pytest.skip("onnx2tf is not installed", allow_module_level=True)

from headrace.client import Client  # noqa: E402
from headrace.client import errors as E  # noqa: E402
from headrace.models.compress.anymodel import AnyModelOptions, run_any  # noqa: E402
from headrace.models.compress.steps import TfliteOptions  # noqa: E402
from headrace.models.repository.store import ModelRepository  # noqa: E402
from tests.support.procs import ROOT  # noqa: E402


@contextmanager
def _litert_worker(model: str, repo: ModelRepository, redis_url: str, log_path: Path, *extra: str) -> Iterator[Any]:
    """A ``--backend litert`` worker process for ``model``, killed on exit (its output in ``log_path``)."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "headrace.workers", "--model", model,
                                 "--model-repo", str(repo.root), "--redis-url", redis_url, "--backend", "litert",
                                 "--consumer", "edge-1", "--block-ms", "50", "--max-wait-ms", "5", *extra],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.kill()
            proc.wait(10)


def _cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


def _tokens(rng: np.random.Generator, lengths: list[int], width: int, vocab: int) -> dict[str, np.ndarray[Any, Any]]:
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode(tok: Any, texts: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    from headrace.models.tokenizer import encode_batch

    return dict(zip(("input_ids", "attention_mask"), encode_batch(tok, texts), strict=True))


def _hf_bert_onnx(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from headrace.models.compress.export import MINILM_AXES, export_onnx

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    ex = _tokens(np.random.default_rng(0), [9, 5], 9, 200)
    export_onnx(Pooled().eval(), ex, path, output_names=["embeddings"], dynamic_axes=MINILM_AXES, check_inputs=[ex])
    return path


@pytest.mark.timeout(240)
def test_hf_bert_tflite_matches_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    from headrace.client.errors import ModelError
    from headrace.models.compress.edge import export_tflite, litert_run_all, static_shapes
    from headrace.models.compress.freeze import needs_freezing
    from headrace.models.compress.source import graph_signature

    src = _hf_bert_onnx(tmp_path / "bert.onnx")
    declared = graph_signature(src)[0]
    assert needs_freezing(declared)  # [batch, sequence]: symbolic beyond the batch axis
    rng = np.random.default_rng(1)
    samples = [_tokens(rng, [n], n, 200) for n in (7, 12, 4)]
    shapes = static_shapes(declared, samples[0], seq_length=16)
    assert shapes == {"input_ids": [1, 16], "attention_mask": [1, 16]}
    exp = export_tflite(src, samples, tmp_path / "tfl", quant="dynamic", shapes=shapes, pad=True)
    assert exp.manifest_extra()["tflite_static_shapes"] == shapes and exp.manifest_extra()["tflite_pad"] is True
    feed = _tokens(rng, [16, 3, 11, 8, 1], 16, 200)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    run = litert_run_all(exp.path, 1, exp.manifest_extra())
    got = run(feed)["embeddings"]
    assert got.shape == ref.shape
    assert _cosines(got, ref).min() >= 0.99, _cosines(got, ref)
    short = {k: v[1:3, :11] for k, v in feed.items()}  # rows of 3 and 11 tokens, sent 11 wide: padded to 16
    assert _cosines(run(short)["embeddings"], ref[1:3]).min() >= 0.99
    with pytest.raises(ModelError, match="static shape"):
        run(_tokens(rng, [20], 20, 200))  # longer than the frozen sequence: refused, not truncated
    _served_as_tensor_entry(exp.path, exp.manifest_extra(), feed, ref, tmp_path / "repo")
    fp32 = litert_run_all(next(exp.path.parent.glob("*_float32.tflite")), 1, exp.manifest_extra())
    assert _cosines(fp32(feed)["embeddings"], ref).min() >= 0.9999  # the conversion itself is exact
    # Frozen to the hidden width (32), [1, 32, 32] tensors look transposed to onnx2tf and it
    # turns them: the float32 check refuses the file before it is offered.
    with pytest.raises(ModelError, match="disagrees with ONNX Runtime"):
        export_tflite(src, samples[:1], tmp_path / "clash", quant="dynamic",
                      shapes=static_shapes(declared, samples[0], seq_length=32), pad=True)


def _served_as_tensor_entry(path: Path, extra: dict[str, Any], feed: dict[str, Any], ref: Any, root: Path) -> None:
    """The frozen file as a tensor-signature entry on the LiteRT servable: token rows of any
    length up to the frozen one are answered; a longer one is a ``bad_shape`` request."""
    from headrace.client.protocol import Envelope, Request
    from headrace.models.repository.store import IOSpec
    from headrace.workers.backends.litert import LiteRTServable

    repo = ModelRepository(root)
    m = repo.add("bert-edge", {"model.tflite": path}, format="tflite", backend="litert", precision="int8",
                 inputs=[IOSpec("input_ids", "int64", (-1,)), IOSpec("attention_mask", "int64", (-1,))],
                 outputs=[IOSpec("embeddings", "float32", (32,))], model_file="model.tflite", extra=extra,
                 source="tests")
    servable = LiteRTServable(m, repo.file_path(m, "model.tflite"))
    lengths = feed["attention_mask"].sum(1)
    reqs = [Request(Envelope(f"r{i}", "reply"), inputs={k: v[i, :n] for k, v in feed.items()})
            for i, n in enumerate(lengths)]
    for r in reqs:
        servable.check(r)
    got = np.stack([servable.infer([r])[0]["embeddings"] for r in reqs])
    assert _cosines(got, ref).min() >= 0.99
    long = Request(Envelope("long", "reply"), inputs={k: np.ones(20, np.int64) for k in feed})
    with pytest.raises(E.InvalidTensorError, match="takes") as err:
        servable.check(long)
    assert err.value.code == E.BAD_SHAPE


def _tiny_bert(tmp_path: Path, name: str, *, max_position: int, max_length: int) -> tuple[Any, ModelRepository]:
    """headrace's encoder, 2 layers of 2 heads, hidden 32, as torch entry ``name`` of a new
    repository (the MiniLM tokenizer, cut at ``max_length``)."""
    import torch

    from headrace.models.builtin.minilm import MiniLM, MiniLMConfig, default_model_path, save_minilm
    from headrace.models.repository.store import IOSpec

    torch.manual_seed(0)
    enc = MiniLM(MiniLMConfig(hidden_size=32, head_dim=16, num_heads=(2, 2), intermediate_sizes=(64, 64),
                              max_position=max_position, source_layers=(0, 1))).eval()
    files = {p.name: p for p in save_minilm(enc, tmp_path / "w")}
    files["tokenizer.json"] = default_model_path() / "tokenizer.json"
    repo = ModelRepository(tmp_path / "repo")
    repo.add(name, files, format="torch", backend="torch", preprocess="bert_tokenizer",
             inputs=[IOSpec("input_ids", "int64", (-1,)), IOSpec("attention_mask", "int64", (-1,))],
             outputs=[IOSpec("embeddings", "float32", (32,))], extra={"arch": "minilm", "max_length": max_length})
    return enc, repo


@pytest.mark.timeout(300)
def test_bert_entry_compressed_to_tflite_and_served_on_litert(redis_url: str, tmp_path: Path) -> None:
    """``--steps tflite`` on a BERT-family repository entry (headrace's encoder, 2 layers, 2
    heads): dynamic-range INT8, gated at cosine 0.99, published, answered by a LiteRT worker."""
    import onnxruntime as ort

    from headrace.models.builtin.corpus import load_corpus
    from headrace.models.builtin.minilm import default_model_path
    from headrace.models.compress.export import MINILM_AXES, export_onnx
    from headrace.models.tokenizer import load_tokenizer

    enc, repo = _tiny_bert(tmp_path, "tiny-bert", max_position=64, max_length=32)
    corpus = load_corpus(["pydoc"])
    (tmp_path / "cal.txt").write_text("\n".join(corpus.train[:40]))
    (tmp_path / "held.txt").write_text("\n".join(corpus.held_out[:40]))
    res = run_any(AnyModelOptions("tiny-bert", data=tmp_path / "cal.txt", held_out=tmp_path / "held.txt",
                                  repo=repo.root, work_dir=tmp_path / "work", steps=("tflite",),
                                  tflite=TfliteOptions(quant="dynamic"), threads=1, progress=False, bench=False,
                                  min_fidelity=0.99))
    assert res.published == ["tiny-bert-tflite-int8-dynamic/1"], (res.refused, res.details)
    m = repo.verify("tiny-bert-tflite-int8-dynamic")
    tok = load_tokenizer(default_model_path() / "tokenizer.json", max_length=32)
    # max_length 32 is also the hidden width: frozen one longer (onnx2tf reads [1, 32, 32] as transposed)
    assert m.measured["fidelity"]["score"] >= 0.99 and m.extra["tflite_static_shapes"]["input_ids"] == [1, 33]
    onnx_path = tmp_path / "fp32.onnx"
    sentences = [*corpus.held_out[40:43], "word " * 80]  # the last one is truncated to max_length
    feeds = [encode(tok, [t]) for t in sentences]
    export_onnx(enc, feeds[0], onnx_path, output_names=["embeddings"], dynamic_axes=MINILM_AXES)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, f)[0] for f in feeds])
    with _litert_worker("tiny-bert-tflite-int8-dynamic", repo, redis_url, tmp_path / "worker.log") as proc, \
            Client(redis_url, timeout_s=120, require_registered=False) as c:
        tickets = [c.submit("tiny-bert-tflite-int8-dynamic", text=t) for t in sentences]
        got = np.stack([t.result(120).raise_for_status().outputs["embeddings"] for t in tickets])
        assert _cosines(got, ref).min() >= 0.99, _cosines(got, ref)
        bad = c.submit("tiny-bert-tflite-int8-dynamic", {"input_ids": np.ones(4, np.int64)}).result(60)
        assert bad.status != "ok"  # a text entry takes text
        again = c.infer("tiny-bert-tflite-int8-dynamic", text=sentences[0], timeout_s=60)  # still serving
        np.testing.assert_allclose(again.outputs["embeddings"], got[0], atol=1e-5)
        assert proc.poll() is None


@pytest.mark.timeout(300)
def test_a_text_limit_equal_to_the_position_table_freezes_below_it_and_long_texts_are_cut(
        redis_url: str, tmp_path: Path) -> None:
    """BERT's usual case: the tokenizer's limit is the position table's size (24 and 24 here),
    so it is a weight dimension; one token more has no position. The file is frozen one token
    shorter, the entry's max_length follows it, and a text longer than that is cut and
    answered at once (it was retried until max_deliveries)."""
    import time

    _, repo = _tiny_bert(tmp_path, "pos-bert", max_position=24, max_length=24)
    texts = [f"sentence number {i} about queues and workers" for i in range(40)]
    (tmp_path / "cal.txt").write_text("\n".join(texts[:20]))
    (tmp_path / "held.txt").write_text("\n".join(texts[20:]))
    res = run_any(AnyModelOptions("pos-bert", data=tmp_path / "cal.txt", held_out=tmp_path / "held.txt",
                                  repo=repo.root, work_dir=tmp_path / "work", steps=("tflite",),
                                  tflite=TfliteOptions(quant="dynamic"), threads=1, progress=False, bench=False,
                                  min_fidelity=0.9))
    assert res.published == ["pos-bert-tflite-int8-dynamic/1"], (res.refused, res.details)
    m = repo.verify("pos-bert-tflite-int8-dynamic")
    assert m.extra["tflite_static_shapes"]["input_ids"] == [1, 23] and m.extra["max_length"] == 23
    with _litert_worker("pos-bert-tflite-int8-dynamic", repo, redis_url, tmp_path / "worker.log", "--lease-s", "30"), \
            Client(redis_url, timeout_s=120, require_registered=False) as c:
        assert c.infer("pos-bert-tflite-int8-dynamic", text="a short one", timeout_s=120).ok  # worker up
        started = time.monotonic()
        long = c.infer("pos-bert-tflite-int8-dynamic", text="word " * 60, timeout_s=60)
        assert long.ok and time.monotonic() - started < 25, (long, time.monotonic() - started)
