"""Build the stock MiniLM entries of a model repository (cached: identical builds are reused).

* ``minilm``: fp32 ONNX (onnxruntime BERT fusions) + ``tokenizer.json``; text in, ``embeddings``
  float32 [384] out (mean pooling and L2 normalisation inside the graph).
* ``minilm-torch``: the same model as a safetensors state dict of our :class:`MiniLM`
  (+ ``minilm_config.json`` + ``tokenizer.json``), served by the torch backend.

A build is identified by a key hashing the source weights, the tokenizer, the build options
and the exporter/optimizer versions; a version whose manifest carries the same key and whose
files verify is returned instead of building again. Builds of one repository are serialised
with an flock so parallel test processes or replicas do not export the same model twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headrace.client.errors import ModelNotFoundError, RepositoryError
from headrace.client.optional import WORKER, require_all
from headrace.models.repository.store import IOSpec, Manifest, ModelRepository, sha256_file

log = logging.getLogger(__name__)

MINILM_NAME = "minilm"
MINILM_TORCH_NAME = "minilm-torch"
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
# Bump when the export/build code changes in a way that changes the produced files.
BUILD_REVISION = 1

TEXT_INPUTS = (IOSpec("input_ids", "int64", (-1,)), IOSpec("attention_mask", "int64", (-1,)))
EMBEDDING_OUTPUTS = (IOSpec("embeddings", "float32", (384,)),)
# What each build imports, by extra: the ONNX entry (False) or the torch entry (True).
BUILD_NEEDS: dict[bool, dict[str, str | tuple[str, ...]]] = {
    False: {"torch": "compress", "onnx": "compress", "onnxruntime": WORKER},
    True: {"torch": "torch", "safetensors": "torch"}}


def _versions_of(*modules: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for m in modules:
        try:
            out[m] = md.version(m)
        except md.PackageNotFoundError:
            out[m] = "absent"
    return out


def build_key(kind: str, source_dir: Path, params: dict[str, Any]) -> str:
    """sha256 over what determines a build's files: weights, tokenizer, options, tool versions."""
    h = hashlib.sha256()
    doc = {"kind": kind, "revision": BUILD_REVISION, "params": params,
           "weights": sha256_file(source_dir / "model.safetensors"),
           "tokenizer": sha256_file(source_dir / "tokenizer.json"),
           "tools": _versions_of("torch", "onnxruntime", "onnx")}
    h.update(json.dumps(doc, sort_keys=True).encode())
    return h.hexdigest()


def find_build(repo: ModelRepository, name: str, key: str) -> Manifest | None:
    """Newest version of ``name`` built with ``key`` whose files still verify, or None."""
    for v in reversed(repo.versions(name)):
        try:
            m = repo.load_manifest(name, v)
            if m.extra.get("build_key") == key:
                return repo.verify(name, v)
        except RepositoryError as e:
            log.warning("cached build %s/%s is unusable (%s); ignoring it", name, v, e)
    return None


@contextlib.contextmanager
def _build_lock(repo: ModelRepository, name: str) -> Iterator[None]:
    lock_path = repo.root / f".{name}.build.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _repo(repo: ModelRepository | str | Path) -> ModelRepository:
    return repo if isinstance(repo, ModelRepository) else ModelRepository(repo)


def _source(model_path: str | Path | None) -> Path:
    from headrace.models.builtin.minilm import default_model_path

    src = Path(model_path) if model_path is not None else default_model_path()
    if not (src / "model.safetensors").is_file() or not (src / "tokenizer.json").is_file():
        raise ModelNotFoundError(f"{src} needs model.safetensors and tokenizer.json")
    return src


def build_minilm(repo: ModelRepository | str | Path, *, optimize: bool = True, name: str = MINILM_NAME,
                 model_path: str | Path | None = None, force: bool = False) -> Manifest:
    """Export fp32 MiniLM to ONNX (BERT-fused when ``optimize``) with its tokenizer into
    ``<repo>/<name>/<next version>``, unless an identical build is already there.

    Returns:
        The (new or cached) manifest.

    Raises:
        ModelNotFoundError: the source weights are not installed.
        ModelError / RepositoryError: export failed or the repository refused the entry.
    """
    from headrace.models.builtin.minilm import MAX_SEQ_LENGTH, load_minilm
    from headrace.models.compress.export import MINILM_AXES, export_minilm
    from headrace.models.tokenizer import load_tokenizer

    r = _repo(repo)
    src = _source(model_path)
    params = {"format": "onnx", "optimize": optimize, "max_length": MAX_SEQ_LENGTH}
    key = build_key("minilm-onnx", src, params)
    with _build_lock(r, name):
        if not force and (cached := find_build(r, name, key)) is not None:
            log.info("reusing %s/%s (identical build)", name, cached.version)
            return cached
        model = load_minilm(src)
        tok = load_tokenizer(src)
        with tempfile.TemporaryDirectory(dir=r.root, prefix=".build-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            report = export_minilm(model, onnx_path, optimize=optimize, tokenizer=tok)
            recipe: list[dict[str, Any]] = [{"step": "export", "params": {
                "exporter": report.exporter, "opset": report.opset, "dynamic_axes": MINILM_AXES}}]
            if optimize:
                recipe.append({"step": "optimize", "params": {
                    "tool": "onnxruntime.transformers.optimizer", "model_type": "bert",
                    "num_heads": 12, "hidden_size": 384, "fused_ops": report.fused_ops}})
            return r.add(
                name, {"model.onnx": onnx_path, "tokenizer.json": src / "tokenizer.json"},
                format="onnx", backend="onnxruntime", precision="fp32", inputs=TEXT_INPUTS,
                outputs=EMBEDDING_OUTPUTS, preprocess="bert_tokenizer", postprocess="none",
                source=MINILM_SOURCE, recipe=recipe,
                measured={"size_bytes": report.size_bytes, "params": model.num_parameters(),
                          "fidelity": {"reference": "torch fp32", "max_abs_diff": report.max_abs_diff,
                                       "min_cosine": report.min_cosine}},
                extra={"build_key": key, "tokenizer": "tokenizer.json", "max_length": MAX_SEQ_LENGTH,
                       "embedding_dim": 384, "minilm_config": model.config.to_dict()},
                description="all-MiniLM-L6-v2 sentence embeddings, fp32 ONNX")


def build_minilm_torch(repo: ModelRepository | str | Path, *, name: str = MINILM_TORCH_NAME,
                       model_path: str | Path | None = None, force: bool = False) -> Manifest:
    """Store MiniLM as a torch-format entry: our module's state dict in safetensors (no
    pickle) + ``minilm_config.json`` + ``tokenizer.json``; cached like :func:`build_minilm`.

    Raises:
        ModelNotFoundError: the source weights are not installed.
        RepositoryError: the repository refused the entry.
    """
    from headrace.models.builtin.minilm import MAX_SEQ_LENGTH, load_minilm, save_minilm

    r = _repo(repo)
    src = _source(model_path)
    params = {"format": "torch", "max_length": MAX_SEQ_LENGTH}
    key = build_key("minilm-torch", src, params)
    with _build_lock(r, name):
        if not force and (cached := find_build(r, name, key)) is not None:
            return cached
        model = load_minilm(src)
        with tempfile.TemporaryDirectory(dir=r.root, prefix=".build-") as tmp:
            weights, cfg = save_minilm(model, tmp)
            return r.add(
                name, {"model.safetensors": weights, "minilm_config.json": cfg,
                       "tokenizer.json": src / "tokenizer.json"},
                format="torch", backend="torch", precision="fp32", inputs=TEXT_INPUTS,
                outputs=EMBEDDING_OUTPUTS, preprocess="bert_tokenizer", postprocess="none",
                source=MINILM_SOURCE, recipe=[{"step": "convert", "params": {"to": "safetensors state dict"}}],
                measured={"size_bytes": weights.stat().st_size, "params": model.num_parameters()},
                extra={"build_key": key, "arch": "minilm", "tokenizer": "tokenizer.json",
                       "max_length": MAX_SEQ_LENGTH, "embedding_dim": 384,
                       "minilm_config": model.config.to_dict()},
                description="all-MiniLM-L6-v2 sentence embeddings, fp32 torch (safetensors)")


def ensure_minilm(repo_path: ModelRepository | str | Path, *, torch_format: bool = False) -> Manifest:
    """Build once, then reuse: what tests and the demo call (e.g. with the ``model_repo_dir``
    fixture). ``torch_format`` builds the ``minilm-torch`` entry instead of ``minilm``.

    Raises:
        MissingDependencyError: torch (``[torch]``), or for the ONNX entry onnx (``[compress]``)
            and onnxruntime (``[worker-cpu]``), is not installed.
        ModelNotFoundError: the weights package is not installed (``[demo]``).
    """
    require_all(BUILD_NEEDS[torch_format], purpose="building MiniLM")
    if torch_format:
        return build_minilm_torch(repo_path)
    return build_minilm(repo_path)
