"""``headrace models add``: import a model, check it through the worker's own servable, and
publish it as the next version of NAME.

The check happens before anything is published: the imported files are staged in a
private repository, loaded by exactly the servable a worker would build for them (or the
operator's ``--servable``), their manifest held to the model (:mod:`headrace.workers.backends.signature`)
and the example run through it. Only a version that passed is copied into the repository,
so a worker never finds a version that cannot start.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.models.importers import Imported, ImportOptions, import_source
from headrace.models.importers.common import synth_example
from headrace.models.repository.manifest import NO_BATCH, Manifest
from headrace.models.repository.store import ModelRepository

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]
EXAMPLE_FILE = "example.npz"


@dataclass(frozen=True)
class AddResult:
    """What ``add`` did.

    Attributes:
        manifest: the published manifest (for ``dry_run``: the staged one, version unset).
        outputs: the example's per-request outputs, as the worker returned them.
        notes: lines for the user (unbatched, shared inputs, conversions).
        published: False for a dry run.
        servable: what served the check (its ``describe()``).
    """

    manifest: Manifest
    outputs: list[dict[str, Array]]
    notes: list[str]
    published: bool
    servable: dict[str, Any]


def _fill(imp: Imported, opts: ImportOptions, work: Path) -> Imported:
    """Apply the CLI-level options and store the example the check runs on."""
    if opts.tokenizer is not None:
        if not opts.tokenizer.is_file():
            raise E.ModelNotFoundError(f"--tokenizer {opts.tokenizer} does not exist")
        imp.files["tokenizer.json"] = opts.tokenizer
        imp.preprocess = "bert_tokenizer"
    if opts.preprocess:
        imp.preprocess = opts.preprocess
    if opts.postprocess:
        imp.postprocess = opts.postprocess
    if opts.max_batch:
        if imp.batch_dim == NO_BATCH and opts.max_batch != 1:
            raise E.ModelError("this model has no batch axis (served unbatched): --max-batch must be 1 or unset")
        imp.max_batch = opts.max_batch
    if opts.max_length:
        imp.extra["max_length"] = opts.max_length
    if imp.preprocess == "bert_tokenizer":
        if "tokenizer.json" not in imp.files:
            raise E.ModelError("a text model (preprocess bert_tokenizer) needs --tokenizer tokenizer.json")
        return imp
    example = dict(opts.example) if opts.example is not None else imp.example
    extra = sorted(set(example or {}) - {s.name for s in imp.inputs})
    if example is not None and extra:
        # kept, a misspelt input would be published in example.npz and never be checked
        example = {k: v for k, v in example.items() if k not in extra}
        imp.notes.append(f"example array(s) {extra} are not inputs of the model "
                         f"({[s.name for s in imp.inputs]}): left out")
    if example is None:
        example = synth_example(imp.inputs, imp.batch_dim != NO_BATCH)
        imp.notes.append("no --example: checked with random inputs made from the signature")
    path = work / EXAMPLE_FILE
    np.savez(path, **example)  # type: ignore[arg-type]  # numpy's stub confuses names with allow_pickle
    imp.files[EXAMPLE_FILE] = path
    imp.example = example
    return imp


def import_for_servable(src: Path, ref: str, opts: ImportOptions) -> Imported:
    """The model file as is, with the operator servable's declared signature: the servable,
    not a backend, knows how to call the model.

    Raises:
        ConfigError: the class cannot be imported. ModelError: no signature, or a source
            whose format the repository does not record.
    """
    from headrace.models.importers import source_kind
    from headrace.models.repository.manifest import DEFAULT_MODEL_FILE, IOSpec
    from headrace.workers.backends.custom import import_servable_class

    cls = import_servable_class(ref)
    kind = source_kind(src)
    if kind not in ("onnx", "torchscript", "pt2"):
        raise E.ModelError(f"with --servable, SOURCE must be an .onnx, TorchScript or .pt2 file (got {kind})")
    if not cls.outputs or (not cls.inputs and not cls.accepts_text):
        raise E.ModelError(f"{ref} must declare its inputs and outputs (class attributes) to be added")
    if cls.accepts_text and opts.tokenizer is None:
        raise E.ModelError(f"{ref} takes text: give its --tokenizer tokenizer.json (the manifest records text "
                           f"models with their tokenizer)")
    inputs = () if cls.accepts_text else tuple(IOSpec(s.name, s.dtype, tuple(s.shape), s.batch_axis) for s in cls.inputs)
    outputs = tuple(IOSpec(s.name, s.dtype, tuple(s.shape), s.batch_axis) for s in cls.outputs)
    return Imported(files={DEFAULT_MODEL_FILE[kind]: src}, format=kind, model_file=DEFAULT_MODEL_FILE[kind],
                    inputs=inputs, outputs=outputs, source=src.name,
                    notes=[f"served by the operator servable {ref}: start workers with --servable {ref}"])


def _publish(repo: ModelRepository, name: str, imp: Imported, *, description: str,
             version: str | None) -> Manifest:
    return repo.add(name, imp.files, format=imp.format, inputs=imp.inputs, outputs=imp.outputs,
                    batch_dim=imp.batch_dim, max_batch=imp.max_batch, preprocess=imp.preprocess,
                    postprocess=imp.postprocess, model_file=imp.model_file, source=imp.source,
                    recipe=imp.recipe, extra=imp.extra, description=description, version=version)


def check_staged(repo: ModelRepository, manifest: Manifest, servable_ref: str = ""
                 ) -> tuple[list[dict[str, Array]], dict[str, Any], list[str] | None]:
    """Load ``manifest``'s version with the servable a worker would use and run its example;
    for a batched tensor model that may batch, also each example request alone. Returns the
    outputs, the servable's ``describe()``, and the outputs whose values changed with the
    other requests of the call (:mod:`headrace.workers.backends.call_mates`; None when the
    example's requests are too few or all alike to tell).

    Raises:
        ModelError / RepositoryError / ConfigError: the model does not load, its manifest does
            not match it, or the example fails.
    """
    from headrace.workers.backends import signature
    from headrace.workers.backends.loader import load_custom_servable, servable_from_manifest
    from headrace.workers.settings import WorkerSettings

    folder = repo.path(manifest.name, manifest.version)
    example = signature.stored_example(manifest, folder)
    if servable_ref:
        settings = WorkerSettings(model=manifest.name, version=manifest.version, model_repo=str(repo.root),
                                  servable=servable_ref)
        servable = load_custom_servable(settings, repo)
    else:
        servable = servable_from_manifest(repo, manifest, intra_op_threads=1)
    try:
        if servable_ref:
            requests = signature.example_requests(manifest, example)
            outputs = servable.infer(requests)
            signature.check_results(manifest, servable.outputs, outputs)
        else:
            outputs = signature.smoke_run(servable, manifest, example)
        moved: list[str] | None = []
        if manifest.batched and manifest.max_batch != 1 and not manifest.accepts_text:
            from headrace.workers.backends.call_mates import can_judge, outputs_moved_by_call_mates

            requests = signature.example_requests(manifest, example)
            moved = outputs_moved_by_call_mates(servable, requests, outputs) if can_judge(requests) else None
        return outputs, servable.describe(), moved
    finally:
        servable.close()


def add_model(repo_root: str | Path, name: str, source: str | Path, opts: ImportOptions, *,
              description: str = "", version: str | None = None, dry_run: bool = False,
              servable: str = "", say: Callable[[str], None] = log.info) -> AddResult:
    """Import ``source``, check it through the worker's servable, publish the next version.

    Args:
        version: an explicit version number; None = one past the highest.
        dry_run: import and check only; publish nothing.
        servable: an operator ``package.module:Class`` to check with (what the worker will
            be started with); empty = the manifest's backend.

    Raises:
        ModelNotFoundError / ModelError / RepositoryError / ConfigError: with a message
            naming what failed; nothing is published then.
    """
    from headrace.models.repository.manifest import check_name

    check_name(name)
    src = Path(source).expanduser()
    with tempfile.TemporaryDirectory(prefix="headrace-add-") as tmp:
        work = Path(tmp)
        say(f"importing {src} ...")
        imp = import_for_servable(src, servable, opts) if servable else import_source(src, opts, work)
        imp = _fill(imp, opts, work)
        stage = ModelRepository(work / "stage")
        staged = _publish(stage, name, imp, description=description, version=None)
        say(f"checking {name} through the {'operator servable ' + servable if servable else staged.backend} "
            f"servable ...")
        try:
            outputs, described, moved = check_staged(stage, staged, servable)
        except E.HeadraceError as e:
            raise type(e)(f"{name} was not added: {e.message}", code=e.code) from e
        if moved is None:
            imp.notes.append("the example's requests are all alike (or just one), so whether a request's answer "
                             "depends on the other requests of its model call was not checked: give an --example "
                             "of different rows (docs/models.md, Batch axes)")
        elif moved:
            imp.max_batch = 1
            staged = replace(staged, max_batch=1)
            imp.notes.append(f"output(s) {moved} of a request change with the other requests of its model call "
                             f"(the model computes across the batch): served one request per call (max_batch 1)")
        if dry_run:
            return AddResult(replace(staged, version="0"), outputs, imp.notes, False, described)
        m = _publish(ModelRepository(repo_root), name, imp, description=description, version=version)
    return AddResult(m, outputs, imp.notes, True, described)
