"""``headrace submit``: one request from the command line."""

from __future__ import annotations

import sys

import click

from headrace.cluster.cli.context import CliConfig, pass_cfg


@click.command()
@click.argument("model")
@click.option("--text", default=None, help="Text input (text models such as minilm).")
@click.option("--input", "input_files", multiple=True, metavar="[NAME=]FILE",
              help="Tensor input from .npy (named by --input NAME=… or the file stem), .npz or .json; repeatable.")
@click.option("--timeout-s", type=float, default=None, help="Longest wait for the result (s).")
@click.option("--deadline-s", type=float, default=None, help="Answer 'expired' instead of running after this (s).")
@click.option("--request-id", default=None, help="Your request id (idempotency key).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@pass_cfg
def submit(cfg: CliConfig, model: str, text: str | None, input_files: tuple[str, ...], timeout_s: float | None,
           deadline_s: float | None, request_id: str | None, as_json: bool) -> None:
    """Submit one request to MODEL, wait, and print its outputs and timings."""
    from rich.console import Console

    from headrace.client import Client
    from headrace.cluster.cli.render import load_inputs, result_json, result_table

    if (text is None) == (not input_files):
        raise click.UsageError("give exactly one of --text or --input")
    inputs = load_inputs(input_files) if input_files else None
    with Client(settings=cfg.client_settings()) as client:
        res = client.infer(model, inputs, text, request_id=request_id, deadline_s=deadline_s,
                           timeout_s=timeout_s, raise_on_error=False)
    if as_json:
        import json

        click.echo(json.dumps(result_json(res)))
    else:
        Console().print(result_table(res))
    if not res.ok:
        sys.exit(2)
