"""``import_huggingface`` on tiny random-weight folders made here, offline: ``max_length``
within the model's position table (RoBERTa-style padding offset included), and the token
inputs taken from what the exported graph takes, not from the tokenizer's list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from headrace.client.errors import ConfigError
from headrace.models.importers.common import ImportOptions
from headrace.models.importers.huggingface import import_huggingface

pytest.importorskip("transformers")
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _vocab() -> str:
    from headrace.models.builtin.minilm import default_model_path

    return str(Path(default_model_path()) / "vocab.txt")


def _save(model: Any, tok: Any, folder: Path) -> Path:
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def _bert(folder: Path, positions: int = 64) -> Path:
    import transformers

    tok = transformers.BertTokenizerFast(vocab_file=_vocab())  # model_max_length unset: a 1e30 sentinel
    return _save(transformers.BertModel(transformers.BertConfig(vocab_size=tok.vocab_size,
                                                                max_position_embeddings=positions, **SMALL)),
                 tok, folder)


def _roberta(folder: Path) -> Path:
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=_bpe(folder), bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>")
    cfg = transformers.RobertaConfig(vocab_size=len(tok), pad_token_id=1, max_position_embeddings=40,
                                     type_vocab_size=1, **SMALL)
    return _save(transformers.RobertaModel(cfg), tok, folder)


def _bpe(folder: Path) -> str:
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a short text", "headrace batches requests from redis streams"] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "bpe.json"))
    return str(folder / "bpe.json")


def _add(folder: Path, tmp_path: Path, **opts: Any) -> Any:
    return import_huggingface(folder, ImportOptions(**opts), tmp_path / "work")


def test_max_length_past_the_position_table_is_refused(tmp_path: Path) -> None:
    """Before: accepted, and every text past 64 tokens failed in the worker."""
    folder = _bert(tmp_path / "bert")
    with pytest.raises(ConfigError, match=r"--max-length 200 is more than the 64 token positions.*"
                                          r"max_position_embeddings 64"):
        _add(folder, tmp_path, max_length=200)
    assert _add(folder, tmp_path, max_length=64).extra["max_length"] == 64


def test_default_max_length_never_exceeds_the_positions(tmp_path: Path) -> None:
    """A sentence-transformers ``max_seq_length`` above the table is cut to it; RoBERTa
    loses ``pad_token_id + 1`` positions to its padding offset (40 - 2 = 38)."""
    bert = _bert(tmp_path / "bert", positions=48)
    (bert / "sentence_bert_config.json").write_text('{"max_seq_length": 512}', encoding="utf-8")
    assert _add(bert, tmp_path, task="feature-extraction").extra["max_length"] == 48
    roberta = _roberta(tmp_path / "roberta")
    assert _add(roberta, tmp_path, task="feature-extraction").extra["max_length"] == 38
    with pytest.raises(ConfigError, match=r"more than the 38 token positions.*less pad_token_id \+ 1 = 2"):
        _add(roberta, tmp_path, task="feature-extraction", max_length=40)


def test_distilbert_with_bert_tokenizer_files_takes_the_graph_inputs(tmp_path: Path) -> None:
    """BERT tokenizer files (which list ``token_type_ids``) next to a DistilBERT, a common
    copy: before, refused with onnxruntime's ``Invalid input name: token_type_ids``."""
    import transformers

    tok = transformers.BertTokenizerFast(vocab_file=_vocab())
    assert "token_type_ids" in tok.model_input_names
    cfg = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                                        max_position_embeddings=64)
    folder = _save(transformers.DistilBertModel(cfg), tok, tmp_path / "distil")
    imported = _add(folder, tmp_path, task="sentence-embedding")
    assert [s.name for s in imported.inputs] == ["input_ids", "attention_mask"]
    assert [s.name for s in _add(_bert(tmp_path / "bert"), tmp_path).inputs] == [
        "input_ids", "attention_mask", "token_type_ids"]  # a BERT still takes them
