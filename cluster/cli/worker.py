"""``headrace worker``: one standalone stream worker (the command is
:func:`headrace.workers.cli.worker`, shared with ``python -m headrace.workers``)."""

from __future__ import annotations

from headrace.workers.cli import worker

__all__ = ["worker"]
