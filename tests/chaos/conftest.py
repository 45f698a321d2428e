"""Fixtures of the chaos tier: the exactly-once report of each test.

Each chaos test ends with :func:`chaos_report` (the fixture) called with its fault and its
:class:`~_chaos.Report`; the line is printed (``pytest -s`` shows it) and, when
``HEADRACE_CHAOS_REPORT`` names a file, appended to it as JSON (``docs/reliability.md``'s
table is filled from such a run).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.support.chaos import Report  # noqa: E402


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    def emit(fault: str, report: Report, **extra: Any) -> None:
        row = {"test": request.node.name, "fault": fault, "sent": report.sent, "answered": report.answered,
               "lost": len(report.lost), "duplicated": len(report.duplicated), "wrong": len(report.wrong),
               "unexpected": len(report.unexpected), "results": report.results, "codes": dict(report.codes),
               **extra}
        print(f"\n[chaos] {fault}: {report.line()} {extra}")
        out = os.environ.get("HEADRACE_CHAOS_REPORT")
        if out:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    return emit
