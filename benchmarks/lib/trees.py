"""Two source trees side by side (before/after benchmarks: ``ab_idle``, ``ab_saturate``,
``commit_cost``). A tree is a checkout, e.g. ``git worktree add /tmp/base <commit>``."""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from pathlib import Path


def add_tree_args(ap: argparse.ArgumentParser) -> None:
    """``--a`` (before) and ``--b`` (after), each a source tree."""
    ap.add_argument("--a", type=Path, required=True, help="source tree A (before)")
    ap.add_argument("--b", type=Path, required=True, help="source tree B (after)")


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs ``tree``'s code (``PYTHONPATH=<tree>/src:<tree>``), with no
    ``HEADRACE_*`` setting of this shell leaking into it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
    env["PYTHONPATH"] = f"{tree}/src:{tree}"
    return env


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
    """Round-by-round differences ``a - b``: their median, their mean, and in how many rounds
    ``a`` was the larger."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.median(diffs), statistics.mean(diffs), sum(d > 0 for d in diffs)
