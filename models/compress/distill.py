"""Distil MiniLM into a shallower (or pruned) student that reproduces its sentence embeddings.

The student starts from teacher layers (e.g. ``[0, 2, 4]``: :func:`init_student`) or from a
pruned copy, and is trained to match the fp32 teacher's normalised embeddings of real
sentences (:mod:`headrace.models.builtin.corpus`) with ``mse_weight * ||s - t||^2 + cosine_weight *
(1 - cos(s, t))`` (the squared distance is summed over the embedding, so for unit vectors
both terms measure the same angle at different scales), AdamW, linear warm-up and decay.

Runs are reproducible and resumable: the order of batches is a pure function of the seed
and the step (a new length-bucketed shuffle each epoch), the learning rate a pure function of the step,
and every ``checkpoint_every`` steps the student (safetensors via
:func:`~headrace.models.builtin.minilm.save_minilm`), the optimizer moments (safetensors) and a JSON
state are written to ``<run_dir>/checkpoint-<step>/``; ``latest.json`` names the newest
complete one. Calling :func:`distill` again on the same ``run_dir`` continues from there and
ends in the same weights as an uninterrupted run. Nothing is pickled. The cached teacher
targets and the batch order live in :mod:`headrace.models.compress.distill_data`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from headrace.client.errors import ConfigError, ModelError
from headrace.models.compress.checkpoints import (  # noqa: F401 - re-exported
    LATEST_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    _load_optimizer,
    _write_checkpoint,
    latest_checkpoint,
    load_student,
)
from headrace.models.compress.distill_data import (
    batches_per_epoch,
    cached_teacher_embeddings,
    encode_texts,
    epoch_batches,
    sentences_fingerprint,
    token_lengths,
)

log = logging.getLogger(__name__)

# Teacher layers the student starts from. Measured on 128 held-out corpus sentences before
# any training (mean cosine to the teacher): 3 layers [0, 2, 4] 0.37, [1, 3, 5] 0.51,
# [0, 3, 5] 0.67; 4 layers [0, 1, 3, 5] 0.76, [0, 2, 4, 5] 0.85. Keeping the last layer
# matters most. After 1,000 steps on the corpus [0, 3, 5] reached only 0.94 held-out, so
# the default is the 4-layer student (2/3 of the encoder's compute).
DEFAULT_STUDENT_LAYERS = (0, 2, 4, 5)


@dataclass(frozen=True)
class DistillConfig:
    """Training settings (all deterministic for a seed).

    Attributes:
        steps: optimizer steps in total (a resumed run stops at the same total).
        batch_size: sentences per step.
        lr: peak learning rate; linear warm-up over ``warmup_steps``, then linear decay to 10%.
        weight_decay: AdamW decoupled weight decay.
        mse_weight / cosine_weight: loss mix (see module docstring).
        max_length: truncation in tokens for training batches (shorter than serving's 256
            keeps steps fast; almost every corpus sentence fits).
        freeze_embeddings: keep the word/position tables fixed (they are most of the
            parameters, learn little from sentence-level targets and slow AdamW down).
        checkpoint_every: steps between checkpoints (0 = only at the end).
        keep_checkpoints: how many checkpoints to keep on disk.
        seed: seeds batch order and any randomness.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    mse_weight: float = 1.0
    cosine_weight: float = 1.0
    max_length: int = 128
    freeze_embeddings: bool = True
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.batch_size >= 1, "batch_size", "must be >= 1 sentence"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps", "must be >= 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.mse_weight >= 0 and self.cosine_weight >= 0 and self.mse_weight + self.cosine_weight > 0,
             "mse_weight/cosine_weight", "must be >= 0 and not both 0"),
            (8 <= self.max_length <= 512, "max_length", "must be between 8 and 512 tokens"),
            (self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0 = only at the end)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"distill {name}: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DistillResult:
    """Outcome of a (possibly resumed) run.

    Attributes:
        run_dir: where checkpoints live.
        steps: total steps done.
        resumed_from: step the run continued from (0 = fresh).
        losses: (step, mean loss over the steps since the previous entry).
        first_loss / final_loss: mean loss of the first and last logged windows.
        train_s: wall time of this invocation's training loop, seconds.
        checkpoint: folder of the final checkpoint.
    """

    run_dir: Path
    steps: int
    resumed_from: int
    losses: tuple[tuple[int, float], ...]
    first_loss: float
    final_loss: float
    train_s: float
    checkpoint: Path
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "resumed_from": self.resumed_from, "first_loss": self.first_loss,
                "final_loss": self.final_loss, "train_s": self.train_s, "config": self.config,
                "losses": [list(x) for x in self.losses]}


def init_student(layers: Sequence[int] = DEFAULT_STUDENT_LAYERS, model_path: str | Path | None = None) -> Any:
    """A MiniLM student with the teacher's embeddings and the chosen teacher layers.

    Raises:
        ModelError: the layers are out of range or the weights are missing.
    """
    from headrace.models.builtin.minilm import load_minilm

    student = load_minilm(model_path, layers=list(layers))
    log.info("student initialised from teacher layers %s (%d params)", list(layers), student.num_parameters())
    return student


# --- schedule, loss ---------------------------------------------------------------------------


def lr_at(step: int, config: DistillConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warm-up, then linear decay to 10%."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    frac = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (1.0 - 0.9 * frac)


def distill_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """``mse_weight * mean_i ||s_i - t_i||^2 + cosine_weight * mean_i (1 - cos(s_i, t_i))``."""
    mse = (student_emb - teacher_emb).pow(2).sum(dim=-1).mean()
    cos = F.cosine_similarity(student_emb, teacher_emb, dim=-1).mean()
    return config.mse_weight * mse + config.cosine_weight * (1.0 - cos)


# --- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillRun:
    """What a distillation learns from and where it keeps its checkpoints.

    Attributes:
        teacher: the fp32 teacher (only run in inference mode, once, to cache targets).
        tokenizer: the teacher's tokenizer.
        sentences: training sentences (never the held-out split).
        run_dir: checkpoint folder; an existing run with the same data, student shape and
            settings is resumed when ``resume``.
        config: training settings (None = :class:`DistillConfig` defaults).
        on_checkpoint: called with (step, folder) after each checkpoint (tests, progress).
        targets: the teacher's embeddings of ``sentences`` if already computed (e.g. shared by
            several runs via :func:`cached_teacher_embeddings`); computed and cached in
            ``run_dir`` otherwise.
    """

    teacher: torch.nn.Module
    tokenizer: Any
    sentences: Sequence[str]
    run_dir: str | Path
    config: DistillConfig | None = None
    resume: bool = True
    progress: bool = True
    on_checkpoint: Callable[[int, Path], None] | None = None
    targets: torch.Tensor | None = None

    @property
    def cfg(self) -> DistillConfig:
        return self.config or DistillConfig()


@dataclass
class _Progress:
    """Where a run stands: the step to start from, the loss log, the newest checkpoint."""

    student: Any
    start_step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Path | None = None


def _targets(run: DistillRun) -> torch.Tensor:
    if run.targets is None:
        return cached_teacher_embeddings(Path(run.run_dir), run.teacher, run.tokenizer, run.sentences,
                                         max_length=run.cfg.max_length, progress=run.progress)
    if tuple(run.targets.shape[:1]) != (len(run.sentences),):
        raise ConfigError(f"targets has {run.targets.shape[0]} rows for {len(run.sentences)} sentences")
    return run.targets


def _resume(run: DistillRun, student: Any, identity: dict[str, Any]) -> _Progress:
    """The checkpointed student and its progress when the run resumes, else a fresh start."""
    ckpt = latest_checkpoint(run.run_dir) if run.resume else None
    if ckpt is None:
        return _Progress(student)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("identity") != identity:
        raise ConfigError(f"{run.run_dir} holds a run with other data or settings; use another run_dir, "
                          f"or resume=False to overwrite it")
    losses = [(int(a), float(b)) for a, b in state.get("losses", [])]
    return _Progress(load_student(ckpt), int(state["step"]), losses, ckpt)


def _optimizer(student: Any, cfg: DistillConfig, prog: _Progress) -> tuple[torch.optim.Optimizer, list[Any]]:
    from safetensors.torch import load_file

    if cfg.freeze_embeddings:
        for p in (student.embeddings.word.weight, student.embeddings.position.weight,
                  student.embeddings.token_type.weight):
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if prog.checkpoint is not None:
        state = json.loads((prog.checkpoint / STATE_FILE).read_text())
        try:
            _load_optimizer(opt, load_file(str(prog.checkpoint / OPTIMIZER_FILE)), state["optimizer"])
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise ModelError(f"cannot restore the optimizer from {prog.checkpoint}: {e}") from e
        log.info("distill: resuming %s from step %d", prog.checkpoint.parent, prog.start_step)
    return opt, params


def _step(run: DistillRun, student: Any, opt: torch.optim.Optimizer, params: list[Any], idx: np.ndarray[Any, Any],
          targets: torch.Tensor, step: int) -> float:
    """One optimizer step on the sentences ``idx``; returns the loss.

    Raises:
        ModelError: the loss is not finite.
    """
    cfg = run.cfg
    ids, mask = encode_texts(run.tokenizer, [run.sentences[i] for i in idx], cfg.max_length)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    loss = distill_loss(student(ids, mask), targets[torch.from_numpy(idx)], cfg)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ModelError(f"distillation diverged at step {step} (loss {value}); lower lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return value


def _train(run: DistillRun, prog: _Progress, targets: torch.Tensor, identity: dict[str, Any]) -> None:
    """Steps ``prog.start_step .. cfg.steps`` with checkpoints; updates ``prog``."""
    from tqdm.auto import tqdm

    cfg, student = run.cfg, prog.student
    opt, params = _optimizer(student, cfg, prog)
    lengths = token_lengths(run.tokenizer, run.sentences, cfg.max_length)
    per_epoch = batches_per_epoch(len(run.sentences), cfg)
    plan: dict[int, list[np.ndarray[Any, Any]]] = {}
    log_every = max(1, min(50, cfg.steps // 20))
    window: list[float] = []
    student.train()
    bar = tqdm(total=cfg.steps, initial=prog.start_step, desc="distill", unit="step", disable=not run.progress)
    try:
        for step in range(prog.start_step, cfg.steps):
            epoch, k = divmod(step, per_epoch)
            if epoch not in plan:
                plan = {epoch: epoch_batches(epoch, lengths, cfg)}
            window.append(_step(run, student, opt, params, plan[epoch][k], targets, step))
            done = step + 1
            if done % log_every == 0 or done == cfg.steps:
                prog.losses.append((done, float(np.mean(window))))
                bar.set_postfix(loss=f"{prog.losses[-1][1]:.5f}")
                window = []
            bar.update(1)
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                state = {"step": done, "identity": identity, "losses": [list(x) for x in prog.losses]}
                prog.checkpoint = _write_checkpoint(Path(run.run_dir), done, student, opt, state,
                                                    cfg.keep_checkpoints)
                if run.on_checkpoint is not None:
                    run.on_checkpoint(done, prog.checkpoint)
    finally:
        bar.close()
        student.eval()


def distill(student: Any, run: DistillRun) -> tuple[Any, DistillResult]:
    """Train ``student`` to reproduce ``run.teacher``'s embeddings of ``run.sentences``.

    Args:
        student: a MiniLM (e.g. :func:`init_student`, or a pruned copy); trained in place
            unless a checkpoint is resumed, in which case the checkpoint's student is returned.
        run: teacher, data, checkpoint folder and settings (:class:`DistillRun`).

    Returns:
        (student in eval mode, result).

    Raises:
        ConfigError: an existing run in ``run.run_dir`` has different data or settings.
        ModelError: a checkpoint cannot be read, or the loss diverged.
    """
    cfg = run.cfg
    if len(run.sentences) < 2:
        raise ConfigError("distillation needs at least 2 training sentences")
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    identity = {"data": sentences_fingerprint(run.sentences), "n": len(run.sentences), "config": cfg.to_dict(),
                "student_config": student.current_config().to_dict()}
    targets = _targets(run)
    torch.manual_seed(cfg.seed)
    prog = _resume(run, student, identity)
    t0 = time.perf_counter()
    _train(run, prog, targets, identity)
    train_s = time.perf_counter() - t0
    if prog.checkpoint is None:  # nothing left to do and no checkpoint: cannot happen for steps >= 1
        raise ModelError(f"distillation in {run.run_dir} produced no checkpoint")
    losses = prog.losses
    result = DistillResult(run_dir=Path(run.run_dir), steps=cfg.steps, resumed_from=prog.start_step,
                           losses=tuple(losses), first_loss=losses[0][1] if losses else float("nan"),
                           final_loss=losses[-1][1] if losses else float("nan"), train_s=train_s,
                           checkpoint=prog.checkpoint, config=cfg.to_dict())
    log.info("distill: %d steps (from %d) in %.0fs, loss %.5f -> %.5f", cfg.steps, prog.start_step, train_s,
             result.first_loss, result.final_loss)
    return prog.student, result
