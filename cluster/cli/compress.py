"""``headrace compress``: the compression pipeline."""

from __future__ import annotations

from typing import Any

import click

from headrace.client.optional import WORKER, require_all
from headrace.cluster.cli.context import CliConfig, pass_cfg

COMPRESS_STEPS = "export, quantize-dynamic, quantize-static, prune, distill, fp16, tensorrt"


@click.command()
@click.argument("model", default="minilm")
@click.option("--steps", default=None, help=f"Comma-separated subset of: {COMPRESS_STEPS}. [default: all]")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Scratch space and distillation checkpoints (a rerun resumes). [default: runs/compress]")
@click.option("--threads", type=int, default=None, help="Threads of every backend while measuring. [default: 2]")
@click.option("--distill-steps", type=int, default=None, help="Training steps of the distillation step.")
@click.option("--prune-heads", type=float, default=None, help="Share of attention heads to remove.")
@click.option("--prune-ffn", type=float, default=None, help="Share of FFN neurons to remove.")
@click.option("--prune-recover-steps", type=int, default=None, help="Recovery training steps after pruning.")
@click.option("--held-out", type=int, default=None, help="Held-out sentences for fidelity (0 = the default set).")
@click.option("--fidelity-budget", type=float, default=None, help="Mean cosine the mixed-precision step must keep.")
@click.option("--bench/--no-bench", default=None, help="Measure speed and fidelity (--no-bench: only build).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG path of the speed-vs-fidelity plot.")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--progress/--no-progress", default=None, help="Show progress bars.")
@pass_cfg
def compress(cfg: CliConfig, model: str, **opts: Any) -> None:
    """Compress MODEL (minilm or digits) into the repository and print the report."""
    require_all({"torch": "compress", "onnx": "compress", "onnxruntime": WORKER}, purpose="headrace compress")
    from headrace.models.compress.pipeline import compress_main

    # Options not given are left out, so compress_main's own defaults stay the one source.
    compress_main(model, repo=cfg.repo, **{k: v for k, v in opts.items() if v is not None})
