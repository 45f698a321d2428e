"""The compression report, full settings: every step for MiniLM and the digits model, every
artifact measured side by side against fp32 torch and fp32 ONNX in one run (same threads).

Prints the tables, writes the speed-vs-fidelity PNGs (``docs/img/compress-<model>.png``), the
markdown tables (``runs/compress/report.md``) and ``measured`` into every manifest. The
distillation run is checkpointed under ``--work-dir`` and resumed if the command is run again.
Asserts nothing about speed: it prints what it measured.

    .venv/bin/python -m benchmarks.compress_report --threads 2 --distill-steps 2000

Takes about 40 minutes on the 2-core development machine (most of it distillation).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from headrace.models.compress.pipeline import STEPS, CompressOptions, run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["minilm", "digits", "all"], default="all")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--threads", type=int, default=2, help="threads for every backend (pinned, equal)")
    ap.add_argument("--repo", default="runs/compress/model_repo",
                    help="model repository to add the artifacts to (e.g. model_repo to serve them)")
    ap.add_argument("--work-dir", default="runs/compress", help="scratch + resumable distillation checkpoints")
    ap.add_argument("--plot-dir", default="docs/img")
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument("--prune-recover-steps", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=0, help="held-out sentences for fidelity (0 = all)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    # onnxruntime's quantizer logs every tensor at INFO on the root logger: show headrace's
    # progress and everyone's warnings only.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.name.startswith("headrace") or r.levelno >= logging.WARNING)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    sections = [f"Command: `.venv/bin/python -m benchmarks.compress_report --threads {args.threads} "
                f"--distill-steps {args.distill_steps}`  ",
                f"Date: {started.date().isoformat()}; host {platform.node()} ({platform.machine()}), "
                f"{args.threads} threads for every backend."]
    details = {}
    for model in (["minilm", "digits"] if args.model == "all" else [args.model]):
        t0 = time.perf_counter()
        opts = CompressOptions(
            model=model, steps=tuple(s for s in args.steps.split(",") if s), repo=Path(args.repo), work_dir=work,
            threads=args.threads, held_out=args.held_out, distill_steps=args.distill_steps,
            prune_recover_steps=args.prune_recover_steps, plot=Path(args.plot_dir) / f"compress-{model}.png",
            progress=not args.quiet)
        res = run(opts)
        took = time.perf_counter() - t0
        sections += [f"\n### {model} ({took / 60:.0f} min)\n", res.markdown]
        sections += [f"\nskipped {k}: {v}" for k, v in res.skipped.items()]
        details[model] = {k: v for k, v in res.details.items()}
        details[model]["artifacts"] = res.artifacts
    report = "\n".join(sections) + "\n"
    (work / "report.md").write_text(report)
    (work / "report_details.json").write_text(json.dumps(details, indent=1, default=str))
    print(report)
    print(f"written: {work / 'report.md'}, {work / 'report_details.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
