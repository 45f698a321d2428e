"""Structured compression of BERT-family text encoders (any config: layers, width, heads,
FFN width, as read from a HuggingFace ``config.json`` into
:class:`~headrace.models.builtin.minilm.MiniLM`), as registered steps of the any-model run:

* ``prune-heads``: remove the least important attention heads and FFN neurons (measured
  contribution variance, ranked across layers; :func:`~headrace.models.compress.prune.prune_minilm`),
  then recover by distillation from the unpruned model on the user's sentences;
* ``drop-layers``: a student keeping every other encoder layer (first and last kept),
  initialised from the teacher's layers and distilled on the user's sentences.

Both need the torch module (a ``format: torch`` entry with ``extra.arch: minilm``) and text
calibration data; the results are exported to fused ONNX and measured like any artifact.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from headrace.client.errors import ConfigError
from headrace.models.compress.steps import Candidate, StepContext, step


def _encoder(ctx: StepContext) -> Any:
    from headrace.models.builtin.minilm import MiniLM

    if not isinstance(ctx.module, MiniLM) or ctx.calibration.texts is None or ctx.tokenizer is None:
        raise ConfigError("this step needs a torch entry of headrace's BERT-family encoder (extra.arch: minilm, "
                          "e.g. `headrace models build minilm --torch`) and text --data; a Hugging Face folder "
                          "is added as ONNX, which these steps cannot reshape")
    return ctx.module


def _distill(ctx: StepContext, student: Any, name: str, lr: float) -> tuple[Any, dict[str, Any]]:
    from headrace.models.compress import distill as D

    cfg = D.DistillConfig(steps=max(1, ctx.prune.recover_steps), lr=lr, warmup_steps=min(30, ctx.prune.recover_steps),
                          batch_size=ctx.prune.batch_size, seed=ctx.seed, checkpoint_every=0)
    run = D.DistillRun(ctx.module, ctx.tokenizer, list(ctx.calibration.texts or ()), ctx.work / name, cfg,
                       resume=False, progress=ctx.progress)
    student, res = D.distill(student, run)
    return student, {k: v for k, v in res.to_dict().items() if k not in ("run_dir", "checkpoint")}


def _export(ctx: StepContext, model: Any, name: str) -> Any:
    from headrace.models.compress.export import export_minilm

    path = ctx.work / f"{name}.onnx"
    export_minilm(model, path, tokenizer=ctx.tokenizer)
    return path


@step("prune-heads")
def prune_heads(ctx: StepContext) -> list[Candidate]:
    """Heads and FFN neurons removed (``--prune-fraction`` of each), then recovered."""
    import torch

    from headrace.models.compress.prune import PruneSpec, prune_minilm

    teacher = _encoder(ctx)
    batches = [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]))
               for f in ctx.calibration.feeds(32, ctx.encode)]
    n_layers = len(teacher.layers)
    spec = PruneSpec(head_fraction=ctx.prune.fraction, ffn_fraction=ctx.prune.fraction,
                     min_heads_per_layer=1, min_ffn_per_layer=min(128, min(teacher.config.intermediate_sizes) // 4))
    pruned, rep = prune_minilm(teacher, batches, spec)
    recipe: list[dict[str, Any]] = [{"step": "prune-heads", "params": {**rep.to_dict(), "layers": n_layers}}]
    if ctx.prune.recover_steps:
        pruned, dres = _distill(ctx, pruned, "prune-heads-recover", lr=1e-4)
        recipe.append({"step": "distill", "params": {**dres, "purpose": "recover after pruning"}})
    ctx.details["prune-heads"] = recipe
    note = f"heads {sum(rep.heads_after)}/{sum(rep.heads_before)}, ffn {sum(rep.ffn_after)}/{sum(rep.ffn_before)}"
    return [Candidate("heads+ffn pruned", _export(ctx, pruned, "heads-pruned"), "onnx", "fp32", recipe, note,
                      params=int(pruned.num_parameters()))]


def keep_layers(n: int) -> list[int]:
    """Every other layer of ``n``, the first and the last always kept."""
    keep = sorted({*range(0, n, 2), n - 1})
    return keep if len(keep) < n else list(range(n))


@step("drop-layers")
def drop_layers(ctx: StepContext) -> list[Candidate]:
    """A shallower student (every other layer) distilled from the model on the user's sentences."""
    from torch import nn

    teacher = _encoder(ctx)
    keep = keep_layers(len(teacher.layers))
    if len(keep) == len(teacher.layers):
        raise ConfigError(f"a {len(keep)}-layer encoder has no layer to drop")
    student = copy.deepcopy(teacher)
    student.layers = nn.ModuleList([student.layers[i] for i in keep])
    src = teacher.config.source_layers or tuple(range(len(teacher.layers)))
    student.config = dataclasses.replace(teacher.config, source_layers=tuple(src[i] for i in keep))
    student.config = student.current_config()
    student, dres = _distill(ctx, student, "drop-layers", lr=5e-4)
    recipe = [{"step": "drop-layers", "params": {**dres, "kept_layers": keep}}]
    ctx.details["drop-layers"] = recipe
    return [Candidate(f"student {len(keep)}L", _export(ctx, student, "student"), "onnx", "fp32", recipe,
                      f"layers {keep} of {len(teacher.layers)}", params=int(student.num_parameters()))]
