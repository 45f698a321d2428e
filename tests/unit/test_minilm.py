"""MiniLM as our own torch module: equivalence with sentence-transformers, students, pruning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from headrace.client.errors import ModelError, ModelNotFoundError
from headrace.models.builtin.minilm import (
    MiniLM,
    MiniLMConfig,
    default_model_path,
    encode_batch,
    load_minilm,
    load_tokenizer,
    save_minilm,
)

SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "Redis Streams deliver each entry to one consumer of a group.",
    "I can't believe it's not butter!",
    "Quantum entanglement links the states of two particles.",
    "Das ist ein deutscher Satz mit Umlauten: äöü ß.",
    "東京は日本の首都です。",
    "emoji test 🚀🔥 with symbols #hashtag @mention",
    "x",
    "",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The stock market fell sharply after the announcement.",
    "   leading and trailing whitespace   ",
    "UPPER CASE SENTENCE SHOULD BE LOWERCASED BY THE TOKENIZER",
    "Numbers like 3.14159 and 2,718 and 1e-9 appear here.",
    "A very long sentence " + "that keeps going and going " * 60 + "until it is truncated.",
    "def f(x): return x ** 2  # some code",
    "She sells sea shells by the sea shore.",
    "Machine learning models can be compressed by pruning, quantization and distillation.",
]


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return load_minilm()


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_tokenizer()


def embed(model: MiniLM, tokenizer, texts: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    ids, mask = encode_batch(tokenizer, texts)
    with torch.inference_mode():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


@pytest.mark.timeout(60)
def test_matches_sentence_transformers(model: MiniLM, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(str(default_model_path()), device="cpu")
    assert st.max_seq_length == 256
    ref = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True, batch_size=32)
    ours = embed(model, tokenizer, SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    cos = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_embeddings(model: MiniLM, tokenizer) -> None:  # type: ignore[no-untyped-def]
    alone = embed(model, tokenizer, [SENTENCES[0]])
    padded = embed(model, tokenizer, [SENTENCES[0], SENTENCES[-1] * 3])
    np.testing.assert_allclose(alone[0], padded[0], atol=1e-5)


def test_tokenizer_truncates_at_256_and_pads_to_longest(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids, mask = encode_batch(tokenizer, ["short", "word " * 1000])
    assert ids.shape == (2, 256) and ids.dtype == np.int64 and mask.dtype == np.int64
    assert mask[1].sum() == 256 and mask[0].sum() == 3  # [CLS] short [SEP]
    ids2, _ = encode_batch(tokenizer, ["short", "two words"])
    assert ids2.shape[1] == 4  # longest of the batch, not a fixed 128


def test_student_from_layer_subset(model: MiniLM) -> None:
    student = load_minilm(layers=[0, 2, 4])
    assert len(student.layers) == 3
    assert student.config.source_layers == (0, 2, 4)
    for new_i, src_i in enumerate([0, 2, 4]):
        assert torch.equal(student.layers[new_i].attention.q.weight, model.layers[src_i].attention.q.weight)
    with pytest.raises(ModelError):
        load_minilm(layers=[0, 9])


def test_pruned_config_roundtrip(tmp_path: Path, model: MiniLM, tokenizer) -> None:  # type: ignore[no-untyped-def]
    pruned = load_minilm(layers=[0, 1])
    att = pruned.layers[0].attention
    keep = torch.arange(6 * 32)  # keep the first 6 of 12 heads
    for lin in (att.q, att.k, att.v):
        lin.weight = torch.nn.Parameter(lin.weight.data[keep].clone())
        lin.bias = torch.nn.Parameter(lin.bias.data[keep].clone())
        lin.out_features = keep.numel()
    att.out.weight = torch.nn.Parameter(att.out.weight.data[:, keep].clone())
    att.out.in_features = keep.numel()
    att.num_heads = 6
    ffn = pruned.layers[1].ffn
    cols = torch.arange(768)
    ffn.inter.weight = torch.nn.Parameter(ffn.inter.weight.data[cols].clone())
    ffn.inter.bias = torch.nn.Parameter(ffn.inter.bias.data[cols].clone())
    ffn.inter.out_features = 768
    ffn.out.weight = torch.nn.Parameter(ffn.out.weight.data[:, cols].clone())
    ffn.out.in_features = 768
    assert pruned.current_config().num_heads == (6, 12)
    assert pruned.current_config().intermediate_sizes == (1536, 768)
    files = save_minilm(pruned, tmp_path)
    assert {f.name for f in files} == {"model.safetensors", "minilm_config.json"}
    back = load_minilm(tmp_path)
    assert back.config.num_heads == (6, 12) and back.config.intermediate_sizes == (1536, 768)
    a, b = embed(pruned, tokenizer, SENTENCES[:4]), embed(back, tokenizer, SENTENCES[:4])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_config_from_dict_rejects_inconsistent() -> None:
    with pytest.raises(ModelError):
        MiniLMConfig.from_dict({"num_heads": [12, 12], "intermediate_sizes": [1536]})
    with pytest.raises(ModelError):
        MiniLMConfig.from_dict({"hidden": 3})
    assert MiniLMConfig.from_dict(MiniLMConfig().to_dict()) == MiniLMConfig()


def test_missing_weights_raise_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_minilm(tmp_path)
