"""A Hugging Face folder whose weights lack what the task runs on is refused, not served with
randomly initialised weights; a folder with a trained head the importer does not serve
(``*ForTokenClassification``) is imported as its default task with a note saying so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from headrace.client.errors import ConfigError  # noqa: E402
from headrace.models.importers.common import ImportOptions  # noqa: E402
from headrace.models.importers.huggingface import import_huggingface  # noqa: E402


def _save(kind: str, folder: Path) -> Path:
    import transformers

    from headrace.models.builtin.minilm import default_model_path

    tok = transformers.BertTokenizerFast(vocab_file=str(Path(default_model_path()) / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                  num_labels=3)
    cls: Any = {"plain": transformers.BertModel, "token": transformers.BertForTokenClassification,
                "sequence": transformers.BertForSequenceClassification}[kind]
    cls(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hfhead")
    return {k: _save(k, base / k) for k in ("plain", "token", "sequence")}


def test_encoder_folder_as_text_classification_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        import_huggingface(folders["plain"], ImportOptions(task="text-classification"), tmp_path)
    msg = str(e.value)
    assert "no trained classification head" in msg
    assert "classifier.weight" in msg and "classifier.bias" in msg
    assert "--task feature-extraction" in msg


def test_token_classification_folder_as_text_classification_is_refused(folders: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    # its classifier has the shape of a sequence classifier's: the missing pooler gives it away
    with pytest.raises(ConfigError) as e:
        import_huggingface(folders["token"], ImportOptions(task="text-classification"), tmp_path)
    msg = str(e.value)
    assert "pooler.dense.weight" in msg and "BertForTokenClassification" in msg
    assert "--task feature-extraction" in msg


def test_token_classification_folder_is_feature_extraction_with_a_note(folders: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    imp = import_huggingface(folders["token"], ImportOptions(), tmp_path)
    assert imp.extra["task"] == "feature-extraction"
    assert any("BertForTokenClassification head is not served" in n for n in imp.notes), imp.notes


def test_trained_folders_import_without_complaint(folders: dict[str, Path], tmp_path: Path) -> None:
    seq = import_huggingface(folders["sequence"], ImportOptions(), tmp_path / "s")
    assert seq.extra["task"] == "text-classification"
    assert not any("not served" in n for n in seq.notes)
    # a plain encoder (no pooler needed) and a sequence classifier read as an encoder
    for kind in ("plain", "sequence"):
        imp = import_huggingface(folders[kind], ImportOptions(task="feature-extraction"), tmp_path / kind)
        assert not any("not served" in n for n in imp.notes)
