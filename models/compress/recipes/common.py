"""What the built-in recipes (minilm, digits) share: running their requested steps, and
the artifacts they measure."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from headrace.models.compress.pipeline import CompressOptions, CompressResult


@dataclass
class _Entry:
    """An artifact to measure: how to build its runner, and where it lives."""

    label: str
    backend: str
    precision: str
    make_run: Callable[[], Callable[[dict[str, np.ndarray[Any, Any]]], np.ndarray[Any, Any]]]
    params: int
    size_bytes: int
    repo_ref: tuple[str, str] | None = None
    note: str = ""
    bench_speed: bool = True


def _artifacts(entries: Sequence[_Entry], res: CompressResult) -> list[Any]:
    """Runnable report artifacts; an entry that cannot run here is reported as skipped."""
    from headrace.models.compress import report as R

    arts = []
    for e in entries:
        try:
            arts.append(R.Artifact(e.label, e.backend, e.precision, e.make_run(), e.params, e.size_bytes,
                                   e.repo_ref, e.note, e.bench_speed))
        except Exception as ex:  # noqa: BLE001 - e.g. an fp16 graph with no CPU kernel: report, go on
            res.skipped[f"bench {e.label}"] = f"cannot run on this machine: {ex}"
    return arts


class RecipeRun(Protocol):
    """One recipe's run: its steps are its methods, ``bench`` its side-by-side report."""

    res: CompressResult

    def bench(self) -> None: ...


RunT = TypeVar("RunT", bound=RecipeRun)


def run_steps(run: RunT, steps: Mapping[str, Callable[[RunT], None]], opts: CompressOptions) -> CompressResult:
    """Every requested step that ``steps`` names, in pipeline order (``opts.ordered_steps()``;
    "export", the base build, is none of them), then the report when ``opts.bench``."""
    for name in opts.ordered_steps():
        if name in steps:
            steps[name](run)
    if opts.bench:
        run.bench()
    return run.res
