"""The report of one ``headrace compress NAME`` run: a rich table on the console, and kept
on disk under ``<work_dir>/reports/<name>-v<version>-<time>/``: ``report.json`` (every
figure, the gate's verdicts and reasons, the data used), ``report.md`` (the table) and
``speed-vs-fidelity.png``. The report is written whether or not anything was published, so a
refused artifact's reason stays on disk.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headrace.models.compress.report import BATCH_SIZES

if TYPE_CHECKING:
    from headrace.models.compress.anymodel import AnyModelOptions, AnyModelResult, Evaluated, Prepared

# Which metrics the table shows for the primary output's kind.
COLUMNS = {
    "classification": ("agreement", "accuracy", "max_abs_error"),
    "binary": ("agreement", "mean_abs_error", "max_abs_error"),
    "embedding": ("mean_cosine", "min_cosine", "overlap_at_k", "spearman"),
    "other": ("mean_abs_error", "max_abs_error", "spread_error"),
}


def report_dir(opts: AnyModelOptions, p: Prepared) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return opts.work_dir / "reports" / f"{p.source.manifest.name}-v{p.source.manifest.version}-{stamp}"


def data_context(p: Prepared) -> dict[str, Any]:
    """What the figures were measured on (stored with them)."""
    return {"source": p.source.ref, "source_note": p.source.note, "calibration": p.calibration.describe(), "held_out": p.held_out.describe(),
            "held_out_split": p.split_note or "separate held-out file", "primary_output": p.primary,
            "kinds": p.kinds, "output_sample_axes": p.axes}


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _cells(e: Evaluated, kind: str) -> list[str]:
    r = e.row
    thr = r.throughput if r is not None else {}
    cells = [e.candidate.label, e.candidate.fmt, e.candidate.precision, _fmt(e.size_bytes / 1e6, ".2f")]
    cells += [_fmt(thr.get(b), ".0f") for b in BATCH_SIZES]
    cells += [_fmt(r.speedup.get(b) if r is not None else None, ".2f") for b in (1, 32)]
    f = e.comparison.flat() if e.comparison else {}
    cells += [_fmt(e.comparison.score if e.comparison else None)] + [_fmt(f.get(k)) for k in COLUMNS[kind]]
    verdict = "reference" if not e.candidate.recipe else (e.published or ("accepted" if e.accepted else "REFUSED"))
    return [*cells, verdict, e.candidate.note]


def _head(kind: str) -> list[str]:
    return (["artifact", "format", "precision", "MB"] + [f"/s @{b}" for b in BATCH_SIZES]
            + ["x fp32 @1", "x fp32 @32", "score", *COLUMNS[kind], "gate", "note"])


def markdown(res: AnyModelResult, kind: str) -> str:
    head = _head(kind)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(e, kind)) + " |" for e in res.evaluated]
    return "\n".join(lines)


def table(res: AnyModelResult, kind: str, title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in _head(kind):
        t.add_column(col, justify="left" if col in ("artifact", "format", "precision", "gate", "note") else "right")
    for e in res.evaluated:
        t.add_row(*_cells(e, kind), style=None if e.accepted or not e.candidate.recipe else "red")
    return t


def plot(res: AnyModelResult, path: Path, title: str, batch_size: int = 32) -> Path | None:
    """PNG: throughput at ``batch_size`` (x, log) against the fidelity score (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(e.row.throughput[batch_size], e.comparison.score, e) for e in res.evaluated
           if e.row is not None and batch_size in e.row.throughput and e.comparison is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for x, y, e in pts:
        color = "tab:gray" if not e.candidate.recipe else ("tab:green" if e.accepted else "tab:red")
        ax.scatter([x], [y], s=60, color=color, zorder=3)
        ax.annotate(e.candidate.label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"throughput at batch {batch_size} (samples/s, log; same threads for all)")
    ax.set_ylabel("fidelity score on held-out data (gate's figure)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def to_json(res: AnyModelResult, context: dict[str, Any]) -> dict[str, Any]:
    from headrace.models.compress.report import _json_safe

    arts = []
    for e in res.evaluated:
        arts.append({"label": e.candidate.label, "format": e.candidate.fmt, "precision": e.candidate.precision,
                     "size_bytes": e.size_bytes, "recipe": e.candidate.recipe, "accepted": e.accepted,
                     "reason": e.reason, "published": e.published,
                     "fidelity": e.comparison.to_dict() if e.comparison else None,
                     "speed": e.row.to_dict() if e.row is not None else None})
    return _json_safe({"context": context, "artifacts": arts, "published": res.published,
                       "refused": res.refused, "details": res.details})


def write(res: AnyModelResult, opts: AnyModelOptions, p: Prepared, context: dict[str, Any], *,
          console: Any = None) -> None:
    """Print the table and keep ``report.json``, ``report.md`` and the PNG in ``res.report_dir``."""
    from rich.console import Console
    from rich.markup import escape

    con = console or Console(width=220)
    kind = p.kinds[p.primary]
    title = (f"{p.source.ref}: held-out {p.held_out.n} samples, primary output {p.primary!r} ({kind}), "
             f"{opts.threads} threads, gate {opts.min_fidelity:g}")
    res.report_dir.mkdir(parents=True, exist_ok=True)
    res.markdown = markdown(res, kind)
    con.print(table(res, kind, title))
    png = plot(res, res.report_dir / "speed-vs-fidelity.png", title)
    (res.report_dir / "report.md").write_text(f"{title}\n\n{res.markdown}\n", encoding="utf-8")
    (res.report_dir / "report.json").write_text(json.dumps(to_json(res, context), indent=1), encoding="utf-8")
    if p.source.note:
        con.print(f"[yellow]source[/yellow]: {escape(p.source.note)}")
    if p.split_note:
        con.print(f"[yellow]held-out data[/yellow]: {escape(p.split_note)}")
    for label, why in res.refused.items():
        con.print(f"[red]refused {escape(label)}[/red]: {escape(why)}")
    for step, why in res.details.get("failed", {}).items():
        con.print(f"[red]step {escape(step)} failed[/red]: {escape(why)}")
    con.print(f"published: {', '.join(res.published) or 'nothing'}; report: {res.report_dir}"
              + (f" (plot {png.name})" if png else ""))
