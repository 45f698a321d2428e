"""What the built-in recipes (minilm, digits) share: the artifacts they measure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from headrace.models.compress.pipeline import CompressResult


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


