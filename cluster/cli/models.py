"""``headrace models``: the model repository."""

from __future__ import annotations

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
