"""Long fuzz run of the request decoder, the SDK's result decoder and the worker loop.

Runs the property tests of ``tests/unit/test_fuzz_protocol.py`` and ``test_fuzz_worker.py``
with ``HEADRACE_FUZZ_SCALE`` times their CI example counts, random seeds
(``HEADRACE_FUZZ_RANDOM=1``), and prints how many cases of each family were tried and how
each was answered (per layer: ``decoder``, ``worker``, ``result``).

    .venv/bin/python -m benchmarks.fuzz --scale 20 [--json runs/fuzz.json]

Exits with pytest's status (non-zero when a property failed; hypothesis prints the case).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tests/unit/test_fuzz_protocol.py", "tests/unit/test_fuzz_worker.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=20, help="multiplier of the CI example counts")
    p.add_argument("--json", default=None, help="write the outcome counts here")
    p.add_argument("--ci", action="store_true", help="CI settings (scale 1, derandomized) instead")
    args = p.parse_args(argv)
    report = Path(tempfile.mkdtemp(prefix="headrace-fuzz-")) / "outcomes.json"
    env = {**os.environ, "HEADRACE_FUZZ_SCALE": "1" if args.ci else str(args.scale),
           "HEADRACE_FUZZ_REPORT": str(report)}
    if not args.ci:
        env["HEADRACE_FUZZ_RANDOM"] = "1"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES],
                          cwd=ROOT, env=env)
    elapsed = time.monotonic() - t0
    counts: dict[str, int] = json.loads(report.read_text()) if report.exists() else {}

    by_family: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for key, n in counts.items():
        layer, family, outcome = key.split("|", 2)
        by_family[(layer, family)][outcome] = n
    table = Table(title=f"fuzz cases tried ({elapsed:.0f} s, scale {1 if args.ci else args.scale})")
    for col in ("layer", "family", "cases", "outcomes"):
        table.add_column(col, justify="right" if col == "cases" else "left")
    totals: dict[str, int] = defaultdict(int)
    for (layer, family), outcomes in sorted(by_family.items()):
        n = sum(outcomes.values())
        totals[layer] += n
        table.add_row(layer, family, str(n), ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(),
                                                                                       key=lambda kv: -kv[1])))
    for layer, n in sorted(totals.items()):
        table.add_row(layer, "[b]total[/b]", f"[b]{n}[/b]", "")
    Console().print(table)
    print(f"total cases: {sum(totals.values())}  (pytest exit status {proc.returncode})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"elapsed_s": round(elapsed, 1), "counts": counts,
                                               "totals": totals, "status": proc.returncode}, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
