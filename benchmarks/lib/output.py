"""Where a benchmark's figures go: the JSON document each run writes beside its tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON to ``path``, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
