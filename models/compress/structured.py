"""Structured (channel) pruning of any torch model with torch-pruning's dependency graph,
then a short recovery distillation from the unpruned model on the user's own samples.

torch-pruning traces the module on a real batch, groups every layer whose channels are
coupled (a convolution, its BatchNorm, the residual Add that joins two branches, the next
layer's input channels) and removes whole channel groups, so the result is a smaller dense
model -- not a mask. Channel importance is the group's L2 weight magnitude. Layers whose
output *is* a model output (the classifier head) are never pruned, so the signature stays.

Recovery needs no labels: the student learns the teacher's outputs on the calibration
samples (KL divergence of temperature-softened distributions for a classifier, MSE
otherwise), which is what "fine-tune on the user's data" can mean for any model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError
from headrace.models.compress.data import Feed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    """Channel pruning and recovery settings.

    Attributes:
        fraction: share of channels removed from every prunable layer, in [0, 0.9].
        round_to: kept channel counts are rounded to a multiple of this (aligned kernels).
        recover_steps: recovery distillation steps (0 = none).
        lr: AdamW learning rate of the recovery.
        batch_size: samples per recovery step.
        temperature: softening of the classifier distributions in the KL loss.
    """

    fraction: float = 0.4
    round_to: int = 4
    recover_steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 0.9:
            raise ConfigError(f"prune fraction {self.fraction} must be in [0, 0.9], e.g. 0.4")
        if self.round_to < 1 or self.recover_steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError("prune round_to >= 1, recover_steps >= 0, lr > 0 and batch_size >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PruneResult:
    """What pruning did: parameters and channel counts before/after, recovery loss."""

    params_before: int
    params_after: int
    channels_before: int
    channels_after: int
    first_loss: float
    final_loss: float
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(feed: Feed) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values())


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _head_layers(module: Any, example: tuple[Any, ...]) -> list[Any]:
    """Layers whose output width is the model's output width: the heads, never pruned."""
    import torch

    with torch.no_grad():
        width = int(_first(module(*example)).shape[-1])
    layers: list[Any] = [m for m in module.modules() if isinstance(m, torch.nn.Linear) and m.out_features == width]
    layers += [m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv1d)
               and m.out_channels == width]
    return layers[-1:] if layers else []


def _channels(module: Any) -> int:
    import torch

    return sum(m.out_channels if isinstance(m, torch.nn.modules.conv._ConvNd) else m.out_features
               for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd | torch.nn.Linear))


def prune_channels(module: Any, example: Feed, options: PruneOptions) -> Any:
    """A pruned copy of ``module`` (the input is left unchanged), traced on ``example``.

    Raises:
        ModelError: torch-pruning cannot trace or prune the module, or the result does not run.
    """
    from headrace.client.optional import require

    tp = require("torch_pruning", "compress", purpose="structured pruning (compress --steps prune)")
    student = copy.deepcopy(module).eval()
    args = _tensors(example)
    try:
        pruner = tp.pruner.MetaPruner(
            student, args, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=options.fraction, ignored_layers=_head_layers(student, args), round_to=options.round_to)
        pruner.step()
        import torch

        with torch.no_grad():
            student(*args)
    except Exception as e:  # noqa: BLE001 - tracing/pruning arbitrary user code raises anything
        raise ModelError(f"torch-pruning could not prune {type(module).__name__}: {e}") from e
    return student


def _loss(student_out: Any, teacher_out: Any, kind: str, temperature: float) -> Any:
    import torch.nn.functional as F

    if kind == "classification" and student_out.ndim == 2:
        t = temperature
        return F.kl_div(F.log_softmax(student_out / t, -1), F.softmax(teacher_out / t, -1),
                        reduction="batchmean") * t * t
    return F.mse_loss(student_out, teacher_out)


def recover(student: Any, teacher: Any, feeds: Sequence[Feed], kind: str, options: PruneOptions,
            *, seed: int = 0, progress: bool = True) -> tuple[float, float]:
    """Distil ``teacher``'s primary output into ``student`` on ``feeds`` (in place).

    Returns (first, final) loss, each averaged over a tenth of the steps.

    Raises:
        ModelError: the loss diverged.
    """
    import torch
    from tqdm.auto import tqdm

    if options.recover_steps == 0 or not feeds:
        return float("nan"), float("nan")
    torch.manual_seed(seed)
    teacher.eval()
    with torch.no_grad():
        targets = [_first(teacher(*_tensors(f))).detach() for f in feeds]
    opt = torch.optim.AdamW(student.parameters(), lr=options.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, options.recover_steps)
    order = np.random.default_rng(seed)
    losses: list[float] = []
    student.train()
    for _ in tqdm(range(options.recover_steps), desc="recover", unit="step", disable=not progress):
        i = int(order.integers(len(feeds)))
        loss = _loss(_first(student(*_tensors(feeds[i]))), targets[i], kind, options.temperature)
        if not torch.isfinite(loss):
            raise ModelError("recovery distillation diverged; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    student.eval()
    k = max(1, len(losses) // 10)
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def prune_and_recover(module: Any, feeds: Sequence[Feed], kind: str, options: PruneOptions, *,
                      seed: int = 0, progress: bool = True) -> tuple[Any, PruneResult]:
    """:func:`prune_channels` then :func:`recover` on ``feeds`` (calibration batches).

    Raises:
        ConfigError: no feeds. ModelError: pruning or recovery failed.
    """
    if not feeds:
        raise ConfigError("pruning needs calibration samples")
    params = sum(p.numel() for p in module.parameters())
    student = prune_channels(module, feeds[0], options)
    first, final = recover(student, module, feeds, kind, options, seed=seed, progress=progress)
    res = PruneResult(params_before=int(params), params_after=int(sum(p.numel() for p in student.parameters())),
                      channels_before=_channels(module), channels_after=_channels(student),
                      first_loss=first, final_loss=final, options=options.to_dict())
    log.info("pruned %s: params %d -> %d, channels %d -> %d, recovery loss %.4f -> %.4f", type(module).__name__,
             res.params_before, res.params_after, res.channels_before, res.channels_after, first, final)
    return student, res
