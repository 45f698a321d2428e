"""Turn worker settings into a loaded servable: pick the manifest, verify, build."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from headrace.client import errors as E
from headrace.models.repository.store import Manifest, ModelRepository
from headrace.workers.backends.base import Servable
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

# WorkerSettings.backend -> manifest formats it can serve.
BACKEND_FORMATS = {"onnx": frozenset({"onnx"}), "torch": frozenset({"torch", "torchscript", "pt2"}),
                   "litert": frozenset({"tflite"})}


def select_manifest(repo: ModelRepository, model: str, version: str = "", backend: str = "") -> Manifest:
    """The manifest to serve: ``version`` if given, else the latest version whose format the
    ``backend`` serves (any format when ``backend`` is empty).

    Raises:
        ModelNotFoundError: unknown model or version, or no version in that backend's format.
        ModelError: the named version's format does not match ``backend``.
        RepositoryError: a malformed or unsafe manifest.
    """
    formats = BACKEND_FORMATS.get(backend)
    if version:
        m = repo.load_manifest(model, version)
        if formats is not None and m.format not in formats:
            raise E.ModelError(f"{model}/{m.version} is format {m.format!r}; backend={backend!r} serves "
                               f"{sorted(formats)}. Unset backend or pick another version")
        return m
    if formats is None:
        return repo.load_manifest(model)
    for v in reversed(repo.versions(model)):
        m = repo.load_manifest(model, v)
        if m.format in formats:
            return m
    raise E.ModelNotFoundError(f"model {model!r} has no version in format {sorted(formats)} "
                               f"(versions: {repo.versions(model) or 'none'}) in {repo.root}")


def servable_from_manifest(repo: ModelRepository, manifest: Manifest, *, intra_op_threads: int = 0,
                           reject_non_finite: bool = True, providers: Sequence[str] | None = None,
                           device: str | None = None, ort_spin: bool = False) -> Servable:
    """Verify the version's checksums and build the servable for its format.

    Raises:
        RepositoryError: a file is missing, modified or escapes the repository.
        ModelError: unsupported format, or the backend cannot load the model.
    """
    m = repo.verify(manifest.name, manifest.version)
    folder = repo.path(m.name, m.version)
    model_path = repo.file_path(m, m.model_file)
    tok: Path | None = None
    if m.accepts_text:
        tok = repo.file_path(m, str(m.extra.get("tokenizer", "tokenizer.json")))
    if m.format == "onnx":
        from headrace.workers.backends.onnx import OnnxServable

        return OnnxServable(m, model_path, tokenizer_path=tok, intra_op_threads=intra_op_threads,
                            providers=providers, reject_non_finite=reject_non_finite,
                            allow_spinning=ort_spin)
    if m.format in ("torch", "torchscript", "pt2"):
        from headrace.workers.backends.torch_backend import load_torch_servable

        return load_torch_servable(m, folder, tokenizer_path=tok, intra_op_threads=intra_op_threads,
                                   device=device, reject_non_finite=reject_non_finite)
    if m.format == "tflite":
        from headrace.workers.backends.litert import LiteRTServable

        return LiteRTServable(m, model_path, tokenizer_path=tok, intra_op_threads=intra_op_threads,
                              reject_non_finite=reject_non_finite)
    raise E.ModelError(f"{m.name}/{m.version}: format {m.format!r} has no servable here "
                       f"(TensorRT engines are served through ONNX Runtime's TensorRT provider)")


def check_servable(servable: Servable, repo: ModelRepository, manifest: Manifest) -> None:
    """The smoke run at start: the version's stored example (text models: a sentence)
    through the loaded servable, outputs checked against the manifest.

    Raises:
        ModelError: the run fails or an output differs from the manifest.
    """
    from headrace.workers.backends import signature

    example = signature.stored_example(manifest, repo.path(manifest.name, manifest.version))
    if example is None and not manifest.accepts_text:
        log.info("%s/%s has no stored example; only its declared signature was checked",
                 manifest.name, manifest.version)
        return
    signature.smoke_run(servable, manifest, example)


def load_custom_servable(settings: WorkerSettings, repo: ModelRepository | None) -> Servable:
    """The operator servable ``settings.servable`` over the repository version, when the
    repository has the model (checksums verified), else without files.

    Raises:
        ConfigError / ModelError: see :func:`~headrace.workers.backends.custom.load_custom`.
        RepositoryError: the version's files do not verify.
    """
    from headrace.workers.backends.custom import load_custom

    manifest: Manifest | None = None
    folder: Path | None = None
    if repo is not None and repo.versions(settings.model):
        manifest = repo.verify(settings.model, settings.version or None)
        folder = repo.path(manifest.name, manifest.version)
    elif settings.version:
        raise E.ModelNotFoundError(f"version {settings.version} of {settings.model!r} is not in the repository")
    return load_custom(settings.servable, settings.model, manifest=manifest, folder=folder,
                       reject_non_finite=settings.reject_non_finite)


def load_servable(settings: WorkerSettings, *, repo: ModelRepository | None = None,
                  providers: Sequence[str] | None = None, device: str | None = None,
                  smoke: bool = True) -> Servable:
    """Load the model ``settings`` names.

    Uses ``settings.model_repo``, ``model``, ``version`` (empty = latest), ``backend``
    (empty = the manifest's format), ``servable`` (an operator class instead of the
    manifest's backend), ``intra_op_threads`` and ``reject_non_finite``. The manifest is
    held to the model: the ONNX graph's declared signature, then (``smoke``) a run of the
    version's stored example.

    Raises:
        ModelNotFoundError: the repository, model or version does not exist.
        RepositoryError: checksum mismatch, unsafe paths, malformed manifest.
        ModelError: the backend cannot load the model, or the manifest does not match it.
        ConfigError: ``settings.servable`` cannot be imported.
    """
    if settings.servable:
        root = Path(settings.model_repo).expanduser()
        return load_custom_servable(settings, repo or (ModelRepository(root) if root.is_dir() else None))
    if repo is None:
        root = Path(settings.model_repo).expanduser()
        if not root.is_dir():
            raise E.ModelNotFoundError(f"model repository {root} does not exist; build it first "
                                       f"(headrace models build) or set HEADRACE_MODEL_REPO")
        repo = ModelRepository(root)
    m = select_manifest(repo, settings.model, settings.version, settings.backend)
    servable = servable_from_manifest(repo, m, intra_op_threads=settings.intra_op_threads,
                                      reject_non_finite=settings.reject_non_finite,
                                      providers=providers, device=device, ort_spin=settings.ort_spin)
    if smoke:
        try:
            check_servable(servable, repo, m)
        except BaseException:
            servable.close()
            raise
    log.info("serving %s/%s from %s", m.name, m.version, repo.root)
    return servable
