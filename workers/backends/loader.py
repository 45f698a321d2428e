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
BACKEND_FORMATS = {"onnx": frozenset({"onnx"}), "torch": frozenset({"torch"}), "litert": frozenset({"tflite"})}


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
    if m.format == "torch":
        from headrace.workers.backends.torch_backend import load_torch_servable

        return load_torch_servable(m, folder, tokenizer_path=tok, intra_op_threads=intra_op_threads,
                                   device=device, reject_non_finite=reject_non_finite)
    if m.format == "tflite":
        from headrace.workers.backends.litert import LiteRTServable

        return LiteRTServable(m, model_path, intra_op_threads=intra_op_threads, reject_non_finite=reject_non_finite)
    raise E.ModelError(f"{m.name}/{m.version}: format {m.format!r} has no servable here "
                       f"(TensorRT engines are served through ONNX Runtime's TensorRT provider)")


def load_servable(settings: WorkerSettings, *, repo: ModelRepository | None = None,
                  providers: Sequence[str] | None = None, device: str | None = None) -> Servable:
    """Load the model ``settings`` names .

    Uses ``settings.model_repo``, ``model``, ``version`` (empty = latest), ``backend``
    (empty = the manifest's format), ``intra_op_threads`` and ``reject_non_finite``.

    Raises:
        ModelNotFoundError: the repository, model or version does not exist.
        RepositoryError: checksum mismatch, unsafe paths, malformed manifest.
        ModelError: the backend cannot load the model.
    """
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
    log.info("serving %s/%s from %s", m.name, m.version, repo.root)
    return servable
