"""Rich renderings of the model repository for ``headrace models list|show``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from headrace.models.repository.store import Manifest, ModelRepository


def _repo(repo: ModelRepository | str | Path) -> ModelRepository:
    return repo if isinstance(repo, ModelRepository) else ModelRepository(repo)


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _measured_brief(measured: dict[str, Any]) -> str:
    parts = []
    tp = measured.get("throughput")
    if isinstance(tp, (int, float)):
        parts.append(f"{tp:.0f}/s")
    elif isinstance(tp, dict) and tp:
        k, v = max(tp.items(), key=lambda kv: str(kv[0]))
        if isinstance(v, (int, float)):
            parts.append(f"{v:.0f}/s@{k}")
    fid = measured.get("fidelity")
    if isinstance(fid, dict):
        for key in ("mean_cosine", "min_cosine", "accuracy"):
            if isinstance(fid.get(key), (int, float)):
                parts.append(f"{key}={fid[key]:.4f}")
                break
    elif isinstance(fid, (int, float)):
        parts.append(f"fidelity={fid:.4f}")
    return " ".join(parts) or "-"


def format_models_table(repo: ModelRepository | str | Path) -> Table:
    """One row per model version: format, precision, input kind, size, recipe, key figures."""
    r = _repo(repo)
    table = Table(title=f"models in {r.root}", show_lines=False)
    for col in ("name", "version", "format", "precision", "input", "size", "recipe", "measured", "created"):
        table.add_column(col, justify="right" if col in {"version", "size"} else "left",
                         no_wrap=col in {"name", "size", "created"})
    rows = r.list()
    for s in rows:
        table.add_row(s.name, s.version, s.format, s.precision,
                      "text" if s.preprocess == "bert_tokenizer" else "tensors",
                      human_bytes(s.size_bytes), " > ".join(s.recipe) or "-",
                      _measured_brief(s.measured), s.created.replace("+00:00", "Z"))
    if not rows:
        table.caption = "empty: build one with `headrace models build`"
    return table


def _kv_table(title: str, items: list[tuple[str, str]]) -> Table:
    t = Table(title=title, show_header=False, box=None, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in items:
        t.add_row(k, v)
    return t


def manifest_renderable(m: Manifest) -> RenderableType:
    """A manifest as a group of tables (summary, signature, recipe, measured, files)."""
    summary = _kv_table(f"{m.name} / {m.version}", [
        ("format", f"{m.format} ({m.backend})"), ("precision", m.precision),
        ("preprocess", m.preprocess), ("postprocess", m.postprocess),
        ("batching", f"max {m.max_batch or 'unbounded'} per call" if m.batched
         else "unbatched (one request per model call)"), ("model file", m.model_file),
        ("source", m.source or "-"), ("created", m.created), ("size", human_bytes(m.size_bytes)),
        ("description", m.description or "-")])
    sig = Table(title="signature (per sample; -1 = dynamic)", title_justify="left")
    for col in ("", "name", "dtype", "shape", "model tensor (B = batch axis)"):
        sig.add_column(col)
    for kind, specs in (("in", m.inputs), ("out", m.outputs)):
        for s in specs:
            full = ["B" if d == -2 else str(d) for d in s.model_shape(-2)] if m.batched and s.batched else \
                [str(d) for d in s.shape]
            note = " (shared by a call)" if m.batched and not s.batched and kind == "in" else ""
            sig.add_row(kind, s.name, s.dtype, str(list(s.shape)), f"[{','.join(full)}]{note}")
    recipe = Table(title="recipe", title_justify="left")
    recipe.add_column("#", justify="right")
    recipe.add_column("step")
    recipe.add_column("params")
    for i, step in enumerate(m.recipe, 1):
        params = step.get("params", {})
        recipe.add_row(str(i), str(step.get("step")), json.dumps(params, sort_keys=True)[:200])
    files = Table(title="files", title_justify="left")
    files.add_column("path")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for f in m.files:
        files.add_row(f.path, human_bytes(f.size_bytes), f.sha256[:16] + "...")
    measured = Text(json.dumps(m.measured, indent=2, sort_keys=True) if m.measured else "-")
    return Group(summary, sig, recipe, _kv_table("measured", []), measured, files)


def show_manifest(repo: ModelRepository | str | Path, name: str, version: str | int | None = None) -> RenderableType:
    """The rich view of ``name``/``version`` (None = latest) for ``headrace models show``.

    Raises:
        ModelNotFoundError: no such model/version. RepositoryError: malformed manifest.
    """
    return manifest_renderable(_repo(repo).load_manifest(name, version))
