"""``headrace models``: the model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from headrace.cluster.cli.context import CliConfig, HeadraceGroup, pass_cfg


@click.group(cls=HeadraceGroup)
def models() -> None:
    """The model repository (--repo)."""


@models.command("list")
@pass_cfg
def models_list(cfg: CliConfig) -> None:
    """Every model and version in the repository."""
    from rich.console import Console

    from headrace.models.repository.store import ModelRepository, format_models_table

    Console().print(format_models_table(ModelRepository(cfg.repo)))


@models.command("show")
@click.argument("name")
@click.option("--version", "version", default=None, help="Version (default: latest).")
@pass_cfg
def models_show(cfg: CliConfig, name: str, version: str | None) -> None:
    """The manifest of NAME (signature, recipe, measurements, files)."""
    from rich.console import Console

    from headrace.models.repository.store import ModelRepository, show_manifest

    shown = show_manifest(ModelRepository(cfg.repo), name, version)
    if shown is not None:
        Console().print(shown)


@models.command("build")
@click.option("--torch", "torch_format", is_flag=True, help="Build the torch-format entry (minilm-torch) instead.")
@pass_cfg
def models_build(cfg: CliConfig, torch_format: bool) -> None:
    """Build all-MiniLM-L6-v2 into the repository (ONNX, optimized) unless an identical build exists."""
    from headrace.models.builtin.build import ensure_minilm

    m = ensure_minilm(cfg.repo, torch_format=torch_format)
    click.echo(f"{m.name} v{m.version} ({m.format}, {m.precision}) in {cfg.repo}")


def _io_options(values: tuple[str, ...], kind: str) -> dict[str, Any]:
    from headrace.models.importers import parse_io

    specs = [parse_io(v) for v in values]
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise click.BadParameter(f"an {kind} is given twice", param_hint=f"--{kind}")
    return by_name


@models.command("add")
@click.argument("name")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--version", "version", default=None, help="Version number to publish (default: the next one).")
@click.option("--input", "inputs", multiple=True, metavar="NAME:DTYPE:SHAPE",
              help="Override an input's signature: DTYPE a wire dtype (float32, int64, ..., string), per-sample "
                   "shape (3,224,224), B marks a batch axis elsewhere (2,B,128), -1 a dynamic dim; ':nobatch' "
                   "for an input shared by a call. Repeatable.")
@click.option("--output", "outputs", multiple=True, metavar="NAME:DTYPE:SHAPE",
              help="Override an output's signature (same syntax). Repeatable.")
@click.option("--example", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="inputs.npz: model inputs (batch axis included) to check the model with, strings as numpy "
                   "str arrays; also fixes a torch program's signature.")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="tokenizer.json: requests carry text, tokenised by the worker.")
@click.option("--task", type=click.Choice(["feature-extraction", "sentence-embedding", "text-classification"]),
              default=None, help="Hugging Face folder: what to serve (default: from the config).")
@click.option("--preprocess", type=click.Choice(["none", "bert_tokenizer"]), default=None,
              help="Manifest preprocess (bert_tokenizer: text in).")
@click.option("--postprocess", type=click.Choice(["none", "l2_normalize", "softmax", "argmax"]), default=None,
              help="Applied by the worker to every output along the last axis.")
@click.option("--max-batch", type=int, default=0, help="Largest model call (0 = unbounded).")
@click.option("--max-length", type=int, default=0, help="Text models: truncate at this many tokens.")
@click.option("--to-onnx", is_flag=True, help="TorchScript / torch.export: convert to ONNX on add.")
@click.option("--servable", default="", metavar="PACKAGE.MODULE:CLASS",
              help="Check with this operator servable (start the worker with the same --servable).")
@click.option("--description", default="", help="One line for humans.")
@click.option("--dry-run", is_flag=True, help="Import and check only; publish nothing.")
@pass_cfg
def models_add(cfg: CliConfig, name: str, source: Path, version: str | None, inputs: tuple[str, ...],
               outputs: tuple[str, ...], example: Path | None, tokenizer: Path | None, task: str | None,
               preprocess: str | None, postprocess: str | None, max_batch: int, max_length: int, to_onnx: bool,
               servable: str, description: str, dry_run: bool) -> None:
    """Add SOURCE as the next version of NAME: read its signature, check it through the
    servable a worker will use, write a checksummed version.

    SOURCE: an .onnx file (external data beside it), TorchScript (.pt/.jit), torch.export
    (.pt2), a Hugging Face model folder, a TensorFlow SavedModel folder, .keras/.h5 or .tflite.
    """
    from rich.console import Console

    from headrace.cluster.ops.add_model import add_model
    from headrace.models.importers import ImportOptions
    from headrace.models.importers.common import load_npz

    if max_batch < 0:
        raise click.BadParameter("must be >= 0", param_hint="--max-batch")
    opts = ImportOptions(inputs=_io_options(inputs, "input"), outputs=_io_options(outputs, "output"),
                         example=load_npz(example) if example is not None else None, tokenizer=tokenizer,
                         preprocess=preprocess or "", postprocess=postprocess or "", max_batch=max_batch,
                         task=task or "", to_onnx=to_onnx, max_length=max_length)
    console = Console(stderr=True)
    with console.status(f"adding {name} from {source.name}"):
        res = add_model(cfg.repo, name, source, opts, description=description, version=version,
                        dry_run=dry_run, servable=servable, say=lambda s: console.log(s))
    out = Console()
    out.print(signature_table(res.manifest, res.published))
    for note in res.notes:
        out.print(f"[yellow]note:[/] {note}")
    if res.published:
        out.print(f"[green]added[/] {res.manifest.name} v{res.manifest.version} ({res.manifest.format}, "
                  f"{res.manifest.size_bytes:,} bytes, {len(res.manifest.files)} files) to {cfg.repo}")
        out.print(f"serve it: headrace worker --model {res.manifest.name}"
                  + (f" --servable {servable}" if servable else ""))
    else:
        out.print("[yellow]dry run:[/] checked, nothing written")


def signature_table(m: Any, published: bool = True) -> Any:
    """A rich table of a manifest's signature: per-sample shape and the model's view."""
    from rich.table import Table

    from headrace.workers.backends.signature import fmt_dims

    title = f"{m.name} v{m.version}" if published else f"{m.name} (dry run)"
    batching = ("unbatched (one request per model call)" if not m.batched
                else f"batched, max {m.max_batch or 'unbounded'} per call")
    t = Table(title=f"{title}: {m.format}, {batching}" + (", text in" if m.accepts_text else ""))
    for col in ("", "name", "dtype", "per-request shape", "model tensor"):
        t.add_column(col)
    if m.accepts_text:
        t.add_row("input", "text", "str", "-", "tokenised: " + ", ".join(s.name for s in m.inputs))
    else:
        for s in m.inputs:
            model_view = fmt_dims(s.model_shape(-1), s.batch_axis) if m.batched and s.batched else \
                fmt_dims(s.shape) + (" (shared by a call)" if m.batched else "")
            t.add_row("input", s.name, s.dtype, fmt_dims(s.shape), model_view)
    for s in m.outputs:
        model_view = fmt_dims(s.model_shape(-1), s.batch_axis) if m.batched and s.batched else fmt_dims(s.shape)
        t.add_row("output", s.name, s.dtype, fmt_dims(s.shape), model_view)
    return t


@models.command("describe")
@click.argument("name")
@click.option("--version", "version", default=None, help="Signature of this version (default: newest served).")
@click.option("--json", "as_json", is_flag=True, help="Print the KServe-v2-style JSON (as GET /v1/models/NAME).")
@pass_cfg
def models_describe(cfg: CliConfig, name: str, version: str | None, as_json: bool) -> None:
    """What producers send to NAME and get back, from the workers' registry in Redis
    (not a local repository): versions served, inputs/outputs, batching, labels."""
    import json

    from rich.console import Console

    from headrace.client import Client
    from headrace.cluster.serve.metadata import model_metadata

    with Client(settings=cfg.client_settings()) as client:
        meta = model_metadata(client.describe(name), version=version)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    Console().print(metadata_table(meta))


def metadata_table(meta: dict[str, Any]) -> Any:
    """A rich rendering of :func:`~headrace.cluster.serve.metadata.model_metadata`."""
    from rich.console import Group
    from rich.table import Table

    state = f"{meta['workers']} live worker(s)" if meta["ready"] else "[red]no live worker[/]"
    batching = f"batched, max {meta['max_batch_size'] or 'unbounded'} per call" if meta["batched"] else "unbatched"
    t = Table(title=f"{meta['name']}: versions {', '.join(meta['versions']) or '-'} ({meta['platform']}); "
                    f"{batching}; {state}")
    for col in ("", "name", "datatype", "per-request shape", "model shape"):
        t.add_column(col)
    for kind in ("inputs", "outputs"):
        for x in meta[kind]:
            t.add_row(kind[:-1], x["name"], x["datatype"], str(x["sample_shape"]), str(x["shape"]))
    lines: list[Any] = [t]
    if meta.get("labels"):
        lines.append(f"labels: {', '.join(map(str, meta['labels']))}")
    if meta.get("description"):
        lines.append(str(meta["description"]))
    return Group(*lines)
