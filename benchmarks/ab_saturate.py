"""Before/after for the SDK's bulk path under saturation: the load generator
(``benchmarks.lib.saturate``: ``AsyncClient.imap`` with single-sample entries by default) run
from source tree A or B, alternating in rounds, each round on a fresh private Redis with a
fresh ``affine`` worker from this tree. Only the SDK's code differs between A and B. A tree
is a checkout (``git worktree add /tmp/base <commit>``); it runs with
``PYTHONPATH=<tree>/src:<tree>``.

    .venv/bin/python -m benchmarks.ab_saturate --a /tmp/base --b . [--rounds 6] [--duration-s 5] [--chunk 1]

Prints each round's samples/s and the load generator's CPU us per sample (``/proc`` CPU of
its process over the counted answers, as ``benchmarks.dataplane`` (a) reports it), then the
paired differences; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from benchmarks.lib.systems import WorkerProcesses
from benchmarks.lib.trees import add_tree_args, paired, tree_env
from headrace.cluster.ops.embedded_redis import EmbeddedRedis


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_tree_args(ap)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=1, help="samples per entry")
    ap.add_argument("--in-flight", type=int, default=1024, help="samples outstanding")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--duration-s", type=float, default=5.0)
    return ap.parse_args()


def one_round(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """samples/s and load-generator CPU us per sample with the SDK of ``tree``."""
    tree = tree.resolve()
    ns = f"ab-{uuid.uuid4().hex[:6]}"
    with EmbeddedRedis() as server, WorkerProcesses(server.url, ns, "affine", fake="affine",
                                                    module="benchmarks.lib.bench_worker", threads=2,
                                                    settings={"max_batch": 256, "max_wait_ms": 2}):
        env = tree_env(tree)
        out = subprocess.run([sys.executable, "-m", "benchmarks.lib.saturate", server.url, ns, "affine", "affine",
                              str(args.in_flight), str(args.warmup_s), str(args.duration_s), str(args.chunk)],
                             cwd=tree, env=env, capture_output=True, text=True, check=True,
                             timeout=args.warmup_s + args.duration_s + 180)
    res = json.loads(out.stdout)
    return {"samples_per_s": res["samples_per_s"], "cpu_us": res["load_generator_cpu_us_per_sample"]}


def main() -> int:
    args = parse_args()
    rows: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for k in range(args.rounds):
        for name, tree in (("A", args.a), ("B", args.b)):
            r = one_round(tree, args)
            rows[name].append(r)
            print(f"round {k} {name} {r['samples_per_s']:9.0f} samples/s  load generator {r['cpu_us']:6.1f} CPU us/sample",
                  flush=True)
    for key, unit in (("samples_per_s", "samples/s"), ("cpu_us", "CPU us/sample")):
        a = [r[key] for r in rows["A"]]
        b = [r[key] for r in rows["B"]]
        median, mean, b_higher = paired(b, a)
        print(f"{unit}: median A {statistics.median(a):.1f} / B {statistics.median(b):.1f}; paired B - A median "
              f"{median:.1f} (mean {mean:.1f}); B higher in {b_higher} of {len(a)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
