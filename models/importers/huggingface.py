"""Import a Hugging Face model folder (``config.json``, safetensors weights, a tokenizer) of a
BERT / RoBERTa / DistilBERT-family encoder, offline.

Tasks (``--task``; default from the folder: a sentence-transformers folder is
``sentence-embedding``, a ``*ForSequenceClassification`` config is ``text-classification``,
anything else ``feature-extraction``):

* ``sentence-embedding``: pooled (mean / CLS / max, from ``1_Pooling/config.json``; mean by
  default) and L2-normalised when the folder's ``modules.json`` has a Normalize module (or
  when it has no sentence-transformers metadata at all) -> output ``embeddings [H]``;
* ``feature-extraction``: the encoder's ``last_hidden_state`` -> output
  ``last_hidden_state [-1, H]``, per token, returned unpadded at each text's own length;
* ``text-classification``: ``logits [num_labels]``; the config's ``id2label`` goes into the
  manifest (``extra.labels``) and the registry, so producers can name the classes.

The encoder and its head are exported with ``torch.onnx.export`` (the maintained exporter;
TorchScript path, opset 17, dynamic batch and sequence axes, checked against torch within
1e-4) and served by ONNX Runtime; the fast tokenizer's ``tokenizer.json`` tokenises in the
worker, padded with the model's own pad id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from headrace.client.errors import ConfigError, ModelError
from headrace.client.optional import install_command
from headrace.models.importers.common import TASKS, Imported, ImportOptions
from headrace.models.repository.manifest import IOSpec

CHECK_TEXTS = ("A short text.", "headrace batches requests from Redis Streams for any encoder model it serves.")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def default_task(folder: Path, config: dict[str, Any]) -> str:
    """The task a folder was made for."""
    if (folder / "modules.json").is_file() or (folder / "config_sentence_transformers.json").is_file():
        return "sentence-embedding"
    if any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "text-classification"
    return "feature-extraction"


def pooling_of(folder: Path) -> tuple[str, bool]:
    """``(pooling mode, normalise)`` of a sentence-transformers folder (mean, normalised otherwise)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    mode = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = _read_json(folder / str(m.get("path", "")) / "config.json")
            for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                              ("pooling_mode_mean_tokens", "mean")):
                if cfg.get(key):
                    mode = name
    return mode, normalize


def _head(model: Any, task: str, pooling: str, normalize: bool) -> Any:
    """The encoder with the task's head, as one module ``(input tensors...) -> output``."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            kw = {"token_type_ids": rest[0]} if rest else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
            if task == "text-classification":
                return out.logits  # type: ignore[no-any-return]
            hidden = out.last_hidden_state
            if task == "feature-extraction":
                return hidden  # type: ignore[no-any-return]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "max":
                pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=-1) if normalize else pooled

    return Head().eval()


def _load(folder: Path, task: str) -> tuple[Any, Any]:
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"importing a Hugging Face folder needs transformers: {install_command('compress')}") from e
    cls = transformers.AutoModelForSequenceClassification if task == "text-classification" else transformers.AutoModel
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
        model = cls.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise ModelError(f"transformers cannot load {folder} offline: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{folder}: no fast tokenizer (tokenizer.json); headrace tokenises with the tokenizers library")
    return model.eval(), tok


def _max_length(folder: Path, tok: Any, config: Any, opts: ImportOptions) -> int:
    if opts.max_length:
        return opts.max_length
    st = folder / "sentence_bert_config.json"
    if st.is_file() and isinstance(_read_json(st).get("max_seq_length"), int):
        return int(_read_json(st)["max_seq_length"])
    cap = int(getattr(config, "max_position_embeddings", 512) or 512)
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        cap -= 2  # RoBERTa positions start after the padding index
    model_max = int(getattr(tok, "model_max_length", cap) or cap)
    return min(cap, model_max)


def import_huggingface(folder: Path, opts: ImportOptions, work_dir: Path) -> Imported:
    """An :class:`Imported` text model (ONNX + ``tokenizer.json``) for a Hugging Face folder.

    Raises:
        ModelError: the folder does not load offline, has no fast tokenizer, the export fails
            or differs from torch.
        ConfigError: transformers is not installed.
    """
    import torch

    from headrace.models.compress.export import export_onnx

    config_raw = _read_json(folder / "config.json")
    task = opts.task or default_task(folder, config_raw)
    if task not in TASKS:
        raise ModelError(f"--task {task!r} must be one of {list(TASKS)}")
    model, tok = _load(folder, task)
    pooling, normalize = pooling_of(folder) if task == "sentence-embedding" else ("", False)
    names = [n for n in TEXT_INPUTS if n in tok.model_input_names]
    enc = tok(list(CHECK_TEXTS), padding=True, return_tensors="pt")
    example = {n: enc[n].to(torch.int64) for n in names}
    hidden = int(model.config.hidden_size)
    out_name, out_shape = {"sentence-embedding": ("embeddings", (hidden,)),
                           "feature-extraction": ("last_hidden_state", (-1, hidden)),
                           "text-classification": ("logits", (int(model.config.num_labels),))}[task]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[out_name] = {0: "batch", 1: "sequence"} if task == "feature-extraction" else {0: "batch"}
    onnx_path = work_dir / "hf" / "model.onnx"
    report = export_onnx(_head(model, task, pooling, normalize), example, onnx_path, output_names=[out_name],
                         dynamic_axes=axes, opset=opts.opset)
    tok_path = work_dir / "hf" / "tokenizer.json"  # the fast tokenizer as one file, for the worker
    tok.backend_tokenizer.save(str(tok_path))
    extra: dict[str, Any] = {"task": task, "max_length": _max_length(folder, tok, model.config, opts),
                             "pad_id": int(tok.pad_token_id if tok.pad_token_id is not None else 0),
                             "model_type": str(getattr(model.config, "model_type", ""))}
    if task == "text-classification":
        extra["labels"] = [str(model.config.id2label[i]) for i in range(int(model.config.num_labels))]
    if task == "sentence-embedding":
        extra.update(pooling=pooling, normalize=normalize)
    return Imported(
        files={"model.onnx": onnx_path, "tokenizer.json": tok_path}, format="onnx",
        model_file="model.onnx", inputs=tuple(IOSpec(n, "int64", (-1,)) for n in names),
        outputs=(IOSpec(out_name, "float32", out_shape),), max_batch=opts.max_batch, preprocess="bert_tokenizer",
        extra=extra, source=str(config_raw.get("_name_or_path") or folder.name),
        recipe=[{"step": "export", "params": {"exporter": report.exporter, "opset": report.opset, "task": task,
                                              "pooling": pooling, "normalize": normalize,
                                              "max_abs_diff": report.max_abs_diff}}],
        notes=[f"{task} of a {extra['model_type'] or 'transformers'} encoder, exported to ONNX "
               f"(max |onnx - torch| {report.max_abs_diff:.2g})"])
