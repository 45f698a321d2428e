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

Weights the task runs on that the folder does not hold (transformers' ``missing_keys``: the
classifier, or the pooler a BERT classifier reads) are refused, not initialised at random; a
head the importer does not serve (``*ForTokenClassification``, ...) gets a note that only the
encoder is served.

The encoder and its head are exported with ``torch.onnx.export`` (the maintained exporter;
TorchScript path, opset 17, dynamic batch and sequence axes, checked against torch within
1e-4, on short texts and on one text of the full ``max_length``) and served by ONNX Runtime;
the fast tokenizer's ``tokenizer.json`` tokenises in the worker, padded with the model's own
pad id. The graph's token inputs are those the model's ``forward`` takes (DistilBERT takes
no ``token_type_ids`` even where its tokenizer files, copied from BERT, list them).

``max_length`` (``--max-length``; default: ``sentence_bert_config.json``'s
``max_seq_length``, else the tokenizer's ``model_max_length``) never exceeds the positions the
model has: ``max_position_embeddings``, less ``pad_token_id + 1`` for RoBERTa-style position
ids that start after the padding index (RoBERTa, XLM-R, CamemBERT: 514 - 2 = 512).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from headrace.client.errors import ConfigError, ModelError
from headrace.client.optional import install_command
from headrace.models.importers.common import TASKS, Imported, ImportOptions
from headrace.models.repository.manifest import IOSpec

CHECK_TEXTS = ("A short text.", "headrace batches requests from Redis Streams for any encoder model it serves.")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what the worker's tokenising feeds
#: model types whose position ids start after the padding index (``padding_idx + 1``), for
#: a model whose position embedding does not say so itself.
PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "mpnet",
                    "longformer", "xmod", "ibert")


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


def _load(folder: Path, task: str) -> tuple[Any, Any, list[str]]:
    """``(model, fast tokenizer, missing keys)``: the keys of the model that the folder's
    weights do not hold (newly initialised, random)."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"importing a Hugging Face folder needs transformers: {install_command('compress')}") from e
    cls = transformers.AutoModelForSequenceClassification if task == "text-classification" else transformers.AutoModel
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
        model, info = cls.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager",
                                          output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise ModelError(f"transformers cannot load {folder} offline: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{folder}: no fast tokenizer (tokenizer.json); headrace tokenises with the tokenizers library")
    return model.eval(), tok, sorted(str(k) for k in (info or {}).get("missing_keys") or ())


def unserved_heads(config: dict[str, Any]) -> list[str]:
    """The folder's ``architectures`` with a trained head this importer does not serve
    (``*ForTokenClassification``, ``*ForMaskedLM``, ``*ForQuestionAnswering``, ...)."""
    return [str(a) for a in config.get("architectures") or []
            if "For" in str(a) and not str(a).endswith("ForSequenceClassification")]


def check_weights(folder: Path, config: dict[str, Any], task: str, missing: list[str]) -> None:
    """Refuse a folder whose weights lack what ``task`` runs on (transformers would
    initialise them at random and the model would serve noise).

    ``text-classification`` needs every weight (the head, and the pooler a BERT head
    classifies from); the other tasks everything but the pooler they never read.

    Raises:
        ConfigError: weights the task needs are missing, naming them and the task to use.
    """
    needed = missing if task == "text-classification" else [
        k for k in missing if ".pooler." not in f".{k}"]
    if not needed:
        return
    shown = ", ".join(needed[:8]) + (f" and {len(needed) - 8} more" if len(needed) > 8 else "")
    verb = "is" if len(needed) == 1 else "are"
    if task == "text-classification":
        other = default_task(folder, config)
        other = "feature-extraction" if other == "text-classification" else other
        heads = unserved_heads(config)
        what = f"; its config names {', '.join(heads)}, a head headrace does not serve" if heads else ""
        raise ConfigError(f"{folder.name}: this folder has no trained classification head ({shown} {verb} missing, "
                          f"transformers would initialise them at random{what}): add it with --task {other}")
    raise ConfigError(f"{folder.name}: the folder's weights do not hold the {config.get('model_type') or 'encoder'} "
                      f"encoder that --task {task} runs ({shown} {verb} missing, transformers would initialise "
                      "them at random)")


def usable_positions(model: Any) -> tuple[int, str] | None:
    """``(positions, why)``: the longest sequence ``model``'s position table holds, and how
    that follows from its config; None when the config has no ``max_position_embeddings``.

    RoBERTa-style position ids count from ``padding_idx + 1`` (the position embedding's
    ``padding_idx``, else the config's ``pad_token_id`` for :data:`PADDED_POSITIONS`), so
    those many positions are never a token's.
    """
    config = model.config
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or table <= 0:
        return None
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    pad = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
    if pad is None and getattr(config, "model_type", "") in PADDED_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and pad >= 0:
        return table - pad - 1, (f"max_position_embeddings {table} less pad_token_id + 1 = {pad + 1} "
                                 "(positions start after the padding index)")
    return table, f"max_position_embeddings {table}"


def _max_length(folder: Path, tok: Any, model: Any, opts: ImportOptions) -> int:
    """Tokens a text is truncated at: ``--max-length``, else the folder's
    ``max_seq_length``, else the tokenizer's ``model_max_length``, never more than the
    model's positions.

    Raises:
        ConfigError: ``--max-length`` is negative or more than the model's positions (a
            longer text would index past its position table and fail in the worker).
    """
    cap = usable_positions(model)
    if opts.max_length < 0:
        raise ConfigError(f"--max-length {opts.max_length} must be a positive number of tokens")
    if opts.max_length:
        if cap is not None and opts.max_length > cap[0]:
            raise ConfigError(f"--max-length {opts.max_length} is more than the {cap[0]} token positions of "
                              f"{folder.name} ({cap[1]}): pass --max-length {cap[0]} or less")
        return opts.max_length
    limit = cap[0] if cap is not None else 512
    st = folder / "sentence_bert_config.json"
    if st.is_file() and isinstance(seq := _read_json(st).get("max_seq_length"), int) and seq > 0:
        return min(seq, limit)
    # model_max_length is a huge sentinel (1e30) when the tokenizer files do not set it
    model_max = getattr(tok, "model_max_length", None)
    return min(limit, int(model_max)) if isinstance(model_max, int) and model_max > 0 else limit


def _input_names(model: Any, tok: Any) -> list[str]:
    """The token inputs to export: ids and mask, and ``token_type_ids`` where the tokenizer
    makes them and the model's ``forward`` takes them (DistilBERT does not)."""
    try:
        takes = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # no signature to read: trust the tokenizer
        takes = set(TEXT_INPUTS)
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tok.model_input_names and "token_type_ids" in takes:
        names.append("token_type_ids")
    return names


def _graph_inputs(onnx_path: Path, names: list[str]) -> list[str]:
    """``names`` that are inputs of the exported graph, in order (an unused input is
    pruned by the exporter).

    Raises:
        ModelError: the graph takes an input the worker does not make from a text, or does
            not take the token ids.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    takes = [i.name for i in graph.input if i.name not in inits]
    bad = [n for n in takes if n not in names]
    if bad or "input_ids" not in takes:
        raise ModelError(f"the exported graph takes {takes}; a text model's tokenizer makes {names} "
                         "(input_ids needed)")
    return [n for n in names if n in takes]


def _full_length_check(model: Any, tok: Any, names: list[str], max_length: int, folder: Path) -> dict[str, Any]:
    """One text of exactly ``max_length`` tokens (the longest the worker will feed), run
    through ``model`` in torch first, so a length the model cannot take fails here,
    clearly, and not in the worker.

    Raises:
        ModelError: the model fails on it.
    """
    import torch

    enc = tok(" ".join([CHECK_TEXTS[1]] * max_length), truncation=True, max_length=max_length, return_tensors="pt")
    batch = {n: enc[n].to(torch.int64) if n in enc else torch.zeros_like(enc["input_ids"]) for n in names}
    try:
        with torch.inference_mode():
            model(**batch)
    except Exception as e:  # noqa: BLE001 - an index or shape error from any layer
        raise ModelError(f"{folder.name} fails on a text of max_length {max_length} tokens: {e}; "
                         "pass a smaller --max-length") from e
    return batch


def import_huggingface(folder: Path, opts: ImportOptions, work_dir: Path) -> Imported:
    """An :class:`Imported` text model (ONNX + ``tokenizer.json``) for a Hugging Face folder.

    Raises:
        ModelError: the folder does not load offline, has no fast tokenizer, fails on a text
            of ``max_length`` tokens, the export fails or differs from torch, or the graph
            takes an input a tokenizer does not make.
        ConfigError: transformers is not installed, or ``--max-length`` is more than the
            model's token positions.
    """
    import torch

    from headrace.models.compress.export import export_onnx

    config_raw = _read_json(folder / "config.json")
    task = opts.task or default_task(folder, config_raw)
    if task not in TASKS:
        raise ModelError(f"--task {task!r} must be one of {list(TASKS)}")
    model, tok, missing = _load(folder, task)
    check_weights(folder, config_raw, task, missing)
    pooling, normalize = pooling_of(folder) if task == "sentence-embedding" else ("", False)
    names = _input_names(model, tok)
    max_length = _max_length(folder, tok, model, opts)
    # truncated as the worker truncates: a tokenizer with a small vocabulary makes many
    # tokens of the check texts, more than a small position table holds
    enc = tok(list(CHECK_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    example = {n: enc[n].to(torch.int64) if n in enc else torch.zeros_like(enc["input_ids"]) for n in names}
    full = _full_length_check(model, tok, names, max_length, folder)
    hidden = int(model.config.hidden_size)
    out_name, out_shape = {"sentence-embedding": ("embeddings", (hidden,)),
                           "feature-extraction": ("last_hidden_state", (-1, hidden)),
                           "text-classification": ("logits", (int(model.config.num_labels),))}[task]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[out_name] = {0: "batch", 1: "sequence"} if task == "feature-extraction" else {0: "batch"}
    onnx_path = work_dir / "hf" / "model.onnx"
    report = export_onnx(_head(model, task, pooling, normalize), example, onnx_path, output_names=[out_name],
                         dynamic_axes=axes, opset=opts.opset,
                         check_inputs=[{n: t.numpy() for n, t in batch.items()} for batch in (example, full)])
    names = _graph_inputs(onnx_path, names)
    tok_path = work_dir / "hf" / "tokenizer.json"  # the fast tokenizer as one file, for the worker
    tok.backend_tokenizer.save(str(tok_path))
    extra: dict[str, Any] = {"task": task, "max_length": max_length,
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
               f"(max |onnx - torch| {report.max_abs_diff:.2g})",
               *(f"the folder's trained {head} head is not served (headrace serves sentence-embedding, "
                 f"feature-extraction and text-classification): this entry is the encoder's {task} "
                 "without it" for head in unserved_heads(config_raw) if task != "text-classification")])
