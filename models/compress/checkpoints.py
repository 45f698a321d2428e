"""Distillation checkpoints: the student (safetensors + config JSON), the optimizer state
(safetensors) and the run state (JSON), written under a temporary name and renamed, then
named in ``latest.json``, so a run killed mid-write resumes from the previous checkpoint.
Nothing is pickled."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from headrace.client.errors import ModelError

LATEST_FILE = "latest.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_checkpoint(run_dir: Path, step: int, student: Any, opt: torch.optim.Optimizer,
                      state: dict[str, Any], keep: int) -> Path:
    from safetensors.torch import save_file

    from headrace.models.builtin.minilm import save_minilm

    final = run_dir / f"checkpoint-{step}"
    # Written under a temporary name and renamed, then named in latest.json: a run killed
    # mid-write leaves the previous checkpoint as the one to resume from.
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=run_dir))
    try:
        save_minilm(student, tmp)
        tensors, opt_meta = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = run_dir / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(json.dumps({"step": step, "checkpoint": final.name}))
    os.replace(latest_tmp, run_dir / LATEST_FILE)
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    p = Path(run_dir) / LATEST_FILE
    if not p.is_file():
        return None
    try:
        name = json.loads(p.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{p} is damaged ({e}); delete it to start the run over") from e
    ckpt = Path(run_dir) / name
    return ckpt if (ckpt / STATE_FILE).is_file() else None


def load_student(checkpoint: str | Path) -> Any:
    """The student saved in a checkpoint folder (eval mode)."""
    from headrace.models.builtin.minilm import load_minilm

    return load_minilm(checkpoint)
