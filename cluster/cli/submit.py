"""``headrace submit``: one request, or many samples in chunks, from the command line."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from headrace.client.wire import dtype_name
from headrace.cluster.cli.context import CliConfig, pass_cfg


@click.command()
@click.argument("model")
@click.option("--text", default=None, help="Text input (text models such as minilm).")
@click.option("--input", "input_files", multiple=True, metavar="[NAME=]FILE",
              help="Tensor input from .npy (named by --input NAME=… or the file stem), .npz (its own names) or "
                   ".json ({name: numbers or strings} or {name: {dtype, shape, data}}); strings in .npy/.npz as "
                   "numpy str arrays; one sample as the model takes it (no batch axis) unless --batch. "
                   "Repeatable.")
@click.option("--texts", "texts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Many text inputs: a UTF-8 file with one text per line, blank lines included (output "
                   "row i answers line i; '-' not supported).")
@click.option("--batch", is_flag=True, help="The --input arrays carry a leading sample dimension: one result per "
                                            "sample, sent in multi-sample entries of --chunk-size.")
@click.option("--chunk-size", type=click.IntRange(1, 65_536), default=None,
              help="Samples per multi-sample entry with --batch/--texts (default: the client's chunk_size, 32; "
                   "1: one request per sample).")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="With --batch or --texts: send the samples through the SDK's array path and write the outputs "
                   "to this .npz (one array per output with a row per sample, plus 'ok', a bool per sample) instead "
                   "of printing each sample; failed samples are listed.")
@click.option("--timeout-s", type=float, default=None, help="Longest wait for the result (s).")
@click.option("--deadline-s", type=float, default=None, help="Answer 'expired' instead of running after this (s).")
@click.option("--request-id", default=None, help="Your request id (idempotency key; single requests only).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON (one line per sample "
                                                      "with --batch/--texts).")
@pass_cfg
def submit(cfg: CliConfig, model: str, text: str | None, input_files: tuple[str, ...], texts_file: str | None,
           batch: bool, chunk_size: int | None, output_file: str | None, timeout_s: float | None,
           deadline_s: float | None, request_id: str | None, as_json: bool) -> None:
    """Submit one request to MODEL, wait, and print its outputs and timings. With --batch or
    --texts: submit every sample (in multi-sample entries), print one result per sample in
    input order (or, with --output, write them as arrays to a .npz), and exit 2 when any
    failed."""
    from headrace.client import Client
    from headrace.cluster.cli.render import load_inputs

    if sum([text is not None, bool(input_files), texts_file is not None]) != 1:
        raise click.UsageError("give exactly one of --text, --input or --texts")
    if batch and not input_files:
        raise click.UsageError("--batch applies to --input arrays")
    many = batch or texts_file is not None
    if many and request_id is not None:
        raise click.UsageError("--request-id names one request; --batch/--texts send many")
    if output_file is not None and not many:
        raise click.UsageError("--output writes the samples of --batch or --texts; add one of them")
    inputs = load_inputs(input_files) if input_files else None
    if output_file is not None:
        _to_file(cfg, model, inputs, _lines(texts_file) if texts_file is not None else None, output_file,
                 chunk_size=chunk_size, timeout_s=timeout_s, deadline_s=deadline_s)
        return
    with Client(settings=cfg.client_settings()) as client:
        if many:
            items = _lines(texts_file) if texts_file is not None else _samples(inputs or {})
            results = client.map(model, items, timeout_s=timeout_s, deadline_s=deadline_s, chunk_size=chunk_size,
                                 progress=False)
        else:
            results = [client.infer(model, inputs, text, request_id=request_id, deadline_s=deadline_s,
                                    timeout_s=timeout_s, raise_on_error=False)]
    _print(results, as_json, many)
    if not all(r.ok for r in results):
        sys.exit(2)


def _to_file(cfg: CliConfig, model: str, inputs: dict[str, Any] | None, texts: list[str] | None, path: str, *,
             chunk_size: int | None, timeout_s: float | None, deadline_s: float | None) -> None:
    """--batch/--texts --output: every sample through ``map_arrays``, the outputs saved as
    arrays; exits 2 (after saving) when a sample failed."""
    import numpy as np

    from headrace.client import Client, ProtocolError

    with Client(settings=cfg.client_settings()) as client:
        try:
            out = client.map_arrays(model, inputs, texts=texts, chunk_size=chunk_size, timeout_s=timeout_s,
                                    deadline_s=deadline_s, raise_on_error=False)
        except ProtocolError as e:
            raise click.UsageError(f"--output: {e}") from e
    if "ok" in out.outputs:
        raise click.UsageError(f"model {model!r} has an output named 'ok', which the .npz keeps for the status mask")
    # string outputs as numpy str arrays: .npz stores those without pickle, object arrays only with it
    arrays: dict[str, Any] = {"ok": out.ok, **{k: v.astype(str) if v.dtype.kind == "O" else v
                                               for k, v in out.outputs.items()}}
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)  # never a pickled object
    os.replace(tmp, path)  # a failed write leaves no half-written file under the name asked for
    click.echo(f"{len(out)} samples, {len(out) - len(out.failures)} ok, {len(out.failures)} failed; "
               f"outputs {', '.join(f'{k} {dtype_name(v.dtype)}{list(v.shape)}' for k, v in out.outputs.items()) or 'none'} "
               f"written to {path}")
    for i in sorted(out.failures)[:20]:
        res = out.failures[i]
        click.echo(f"sample {i}: {res.status} {res.code}: {res.message}")
    if len(out.failures) > 20:
        click.echo(f"... and {len(out.failures) - 20} more failed samples")
    if out.failures:
        sys.exit(2)


def _lines(path: str) -> list[str]:
    """One text per line, every line kept (a blank line is an empty text) so that output
    row i answers line i; lines end at "\n" only (a "\r" before it is dropped).

    Raises:
        ProtocolError: ``bad_value``, the file is not UTF-8 (where it is not is named).
    """
    from pathlib import Path

    from headrace.client import errors as E

    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise E.ProtocolError(f"--texts {path}: not UTF-8 ({e.reason} at byte {e.start}, line {line}); save it "
                              f"as UTF-8 (e.g. iconv -t utf-8)", code=E.BAD_VALUE) from e
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line starts no text of its own
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _samples(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    sizes = {len(a) if getattr(a, "ndim", 0) else 0 for a in inputs.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise click.UsageError("--batch needs every --input array to have the same leading (sample) dimension")
    n = sizes.pop()
    return [{k: a[i] for k, a in inputs.items()} for i in range(n)]


def _print(results: list[Any], as_json: bool, many: bool) -> None:
    from rich.console import Console

    from headrace.cluster.cli.render import result_json, result_table

    if as_json:
        import json

        for res in results:
            click.echo(json.dumps(result_json(res)))
        return
    console = Console()
    for i, res in enumerate(results):
        if many:
            console.print(f"sample {i}")
        console.print(result_table(res))
