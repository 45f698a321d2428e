"""``headrace compress``: compress any repository model, or run a built-in recipe.

``headrace compress NAME --data FILE`` works on any ONNX or torch entry of the repository
(:mod:`headrace.models.compress.anymodel`); ``headrace compress minilm|digits`` without
``--data`` runs the built-in recipes on their own corpora. Options map one to one onto the
fields of the option objects (``AnyModelOptions`` and the nested ``QuantizeOptions``,
``PruneOptions``, ``TfliteOptions``; ``CompressOptions`` for recipes), whose defaults stay
the one source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from headrace.client.optional import WORKER, require_all
from headrace.cluster.cli.context import CliConfig, pass_cfg

STEP_HELP = ("any model: quantize-dynamic, quantize-static, fp16, prune, tflite; BERT-family torch entries: "
             "prune-heads, drop-layers; recipes (minilm, digits): "
             "export, quantize-dynamic, quantize-static, prune, distill, fp16, tensorrt")
# CLI option -> (option object, field); "" = AnyModelOptions itself.
ANY_FIELDS = {
    "version": ("", "version"), "data": ("", "data"), "held_out": ("", "held_out"),
    "held_out_fraction": ("", "held_out_fraction"), "min_fidelity": ("", "min_fidelity"), "kind": ("", "kind"),
    "output": ("", "output"), "publish": ("", "publish"), "calibration_limit": ("", "calibration_limit"),
    "calibration_method": ("quantize", "method"), "per_channel": ("quantize", "per_channel"),
    "weight_bits": ("quantize", "weight_bits"),
    "mixed": ("quantize", "mixed"), "prune_fraction": ("prune", "fraction"),
    "recover_steps": ("prune", "recover_steps"), "tflite_quant": ("tflite", "quant"),
    "tflite_seq_length": ("tflite", "seq_length"),
}
RECIPE_FIELDS = {"distill_steps": "distill_steps", "prune_heads": "prune_heads", "prune_ffn": "prune_ffn",
                 "prune_recover_steps": "prune_recover_steps", "held_out_sentences": "held_out",
                 "fidelity_budget": "fidelity_budget", "plot": "plot"}
SHARED_FIELDS = ("steps", "threads", "work_dir", "seed", "progress", "bench")


def build_options(name: str, repo: str, given: dict[str, Any]) -> Any:
    """The option object for this command line: ``CompressOptions`` for a recipe (minilm or
    digits without ``--data``), ``AnyModelOptions`` otherwise.

    Raises:
        ConfigError: options of the other kind, or invalid values.
    """
    from headrace.client.errors import ConfigError
    from headrace.models.compress import anymodel, pipeline, steps

    shared: dict[str, Any] = {k: given[k] for k in SHARED_FIELDS if k in given}
    if "work_dir" in shared:
        shared["work_dir"] = Path(shared["work_dir"])
    if "steps" in shared:
        shared["steps"] = tuple(s.strip() for s in shared["steps"].split(",") if s.strip())
    if name in pipeline.MODELS and "data" not in given:
        stray = sorted(k for k in given if k in ANY_FIELDS)
        if stray:
            raise ConfigError(f"{stray} apply to --data runs; the {name} recipe uses its own corpus")
        rec: dict[str, Any] = {RECIPE_FIELDS[k]: (Path(v) if k == "plot" else v) for k, v in given.items()
                               if k in RECIPE_FIELDS}
        return pipeline.CompressOptions(model=name, repo=Path(repo), **rec, **shared)
    stray = sorted(k for k in given if k in RECIPE_FIELDS)
    if stray:
        raise ConfigError(f"{stray} apply to the built-in minilm/digits recipes only")
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"quantize": {}, "prune": {}, "tflite": {}}
    for k, v in given.items():
        if k in ANY_FIELDS:
            obj, fld = ANY_FIELDS[k]
            (nested[obj] if obj else top)[fld] = Path(v) if fld in ("data", "held_out") else v
    return anymodel.AnyModelOptions(
        name=name, repo=Path(repo), quantize=steps.QuantizeOptions(**nested["quantize"]),
        prune=steps.PruneOptions(**nested["prune"]), tflite=steps.TfliteOptions(**nested["tflite"]), **top, **shared)


@click.command()
@click.argument("name")
@click.option("--version", default=None, help="Repository version to compress. [default: latest]")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Calibration data: .npz keyed by input name (+ optional 'labels'), or a text file, one sample a line.")
@click.option("--held-out", type=click.Path(dir_okay=False), default=None,
              help="Evaluation data, never calibrated on. [default: a seeded split of --data, stated in the report]")
@click.option("--held-out-fraction", type=float, default=None, help="Share of --data held out without --held-out.")
@click.option("--steps", default=None, help=f"Comma-separated steps ({STEP_HELP}).")
@click.option("--min-fidelity", type=float, default=None,
              help="Gate: artifacts scoring below it on held-out data are not added. [default: 0.99]")
@click.option("--publish", type=click.Choice(["name", "version", "none"]), default=None,
              help="Add accepted artifacts as NAME-<suffix> entries, as new versions of NAME, or not at all.")
@click.option("--kind", type=click.Choice(["classification", "binary", "embedding", "other"]), default=None,
              help="Kind of the gated output (picks the metrics). [default: inferred]")
@click.option("--output", default=None, help="The one output the gate looks at (and the table shows). [default: "
                                             "every output is gated, each by its kind; the table shows the first]")
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None)
@click.option("--calibration-limit", type=int, default=None, help="Use at most this many calibration samples.")
@click.option("--per-channel/--per-tensor", default=None, help="INT8 weight scales per output channel.")
@click.option("--weight-bits", type=click.Choice(["auto", "8", "7"]), default=None,
              help="INT8 weight precision: 7 bits (ONNX Runtime's reduce_range) avoids the saturation of 8-bit "
                   "weights in its integer kernels on x86 CPUs without VNNI; auto picks 7 there, else 8. "
                   "[default: auto]")
@click.option("--mixed/--no-mixed", default=None, help="Keep the most sensitive nodes fp32 until the gate holds.")
@click.option("--prune-fraction", type=float, default=None, help="Share of channels torch-pruning removes.")
@click.option("--recover-steps", type=int, default=None, help="Recovery distillation steps after pruning.")
@click.option("--tflite-quant", type=click.Choice(["integer", "dynamic"]), default=None,
              help="TFLite INT8: integer (weights and activations, calibrated) or dynamic (weights). "
                   "[default: dynamic for text models, integer otherwise]")
@click.option("--tflite-seq-length", type=int, default=None,
              help="Token length a text model's TFLite graph is frozen to. [default: the tokenizer's]")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Scratch space and kept reports (reports/). [default: runs/compress]")
@click.option("--threads", type=int, default=None, help="Threads of every backend while measuring. [default: 2]")
@click.option("--distill-steps", type=int, default=None, help="Recipes: training steps of the distillation step.")
@click.option("--prune-heads", type=float, default=None, help="Recipes: share of attention heads to remove.")
@click.option("--prune-ffn", type=float, default=None, help="Recipes: share of FFN neurons to remove.")
@click.option("--prune-recover-steps", type=int, default=None, help="Recipes: recovery steps after pruning.")
@click.option("--held-out-sentences", type=int, default=None, help="Recipes: held-out sentences (0 = all).")
@click.option("--fidelity-budget", type=float, default=None, help="Recipes: what mixed precision must keep.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Recipes: PNG path of the plot.")
@click.option("--bench/--no-bench", default=None, help="Measure speed (--no-bench: fidelity only).")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--progress/--no-progress", default=None, help="Show progress bars.")
@pass_cfg
def compress(cfg: CliConfig, name: str, **opts: Any) -> None:
    """Compress NAME (any ONNX/torch repository model with --data; minilm or digits recipes
    without) into the repository and print the report.

    Exits 1 when nothing was published (every step failed or was refused by the gate),
    unless --publish none."""
    require_all({"torch": "compress", "onnx": "compress", "onnxruntime": WORKER}, purpose="headrace compress")
    from headrace.models.compress.pipeline import compress_main

    options = build_options(name, cfg.repo, {k: v for k, v in opts.items() if v is not None})
    res = compress_main(options)
    if getattr(options, "publish", "none") != "none" and not getattr(res, "published", True):
        # A script running `compress ... && deploy` must see that nothing was made.
        raise click.ClickException("nothing was published: every step failed or was refused by the gate (the "
                                   "reasons are above)")
