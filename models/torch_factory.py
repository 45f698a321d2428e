"""Which code builds the ``torch.nn.Module`` of a ``format: torch`` repository entry.

``extra.arch == "minilm"`` builds :class:`~headrace.models.builtin.minilm.MiniLM` from the
folder; otherwise ``extra.torch_factory = "headrace.some.module:function"`` names a factory
``function(folder: Path, manifest: Manifest) -> torch.nn.Module``. Factories are only looked
up inside the ``headrace`` package, so a manifest cannot make a process import arbitrary code.
Shared by the torch servable (workers) and the compression pipeline (models).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from headrace.client import errors as E
from headrace.models.repository.manifest import Manifest

if TYPE_CHECKING:
    import torch

Factory = Callable[[Path, Manifest], "torch.nn.Module"]
FACTORY_PREFIX = "headrace."


def _minilm_factory(folder: Path, manifest: Manifest) -> torch.nn.Module:
    from headrace.models.builtin.minilm import load_minilm

    return load_minilm(folder / manifest.model_file)


BUILTIN_ARCHS: dict[str, Factory] = {"minilm": _minilm_factory}


def resolve_factory(manifest: Manifest) -> Factory:
    """The module factory for a torch-format manifest.

    Raises:
        ModelError: no ``arch``/``torch_factory``, an unknown arch, or a factory outside ``headrace``.
    """
    arch = manifest.extra.get("arch")
    if isinstance(arch, str) and arch in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[arch]
    ref = manifest.extra.get("torch_factory")
    if not isinstance(ref, str) or ":" not in ref:
        raise E.ModelError(f"{manifest.name}/{manifest.version}: a torch entry needs extra.arch in "
                           f"{sorted(BUILTIN_ARCHS)} or extra.torch_factory='headrace.module:function'")
    mod_name, _, fn_name = ref.partition(":")
    if not mod_name.startswith(FACTORY_PREFIX):
        raise E.ModelError(f"torch_factory {ref!r} must live in the headrace package; refusing to import it")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise E.ModelError(f"cannot import torch_factory {ref!r}: {e}") from e
    if not callable(fn):
        raise E.ModelError(f"torch_factory {ref!r} is not callable")
    return fn  # type: ignore[no-any-return]


def build_module(folder: Path, manifest: Manifest) -> torch.nn.Module:
    """Build the entry's module with its factory (eval mode).

    Raises:
        ModelError: no usable factory, or the factory failed.
    """
    factory = resolve_factory(manifest)
    try:
        module = factory(folder, manifest)
    except E.HeadraceError:
        raise
    except Exception as e:  # noqa: BLE001 - factories are model code
        raise E.ModelError(f"{manifest.name}/{manifest.version}: building the torch module failed: {e}") from e
    return module.eval()
