"""A Triton-like model repository: ``<repo>/<name>/<version>/`` with ``manifest.json``.

Each version folder holds the model files and a JSON manifest (never pickle) describing the
signature, pre/post-processing, how the model was made (compression recipe), what was
measured about it, and a sha256 checksum of every file. Versions are positive integers;
"latest" is the highest one with a manifest.

Safety: names, versions and file paths must stay inside the repository (no ``..``, no
absolute paths, no symlinks leading out), and :meth:`ModelRepository.verify` refuses files
whose checksum or size differ from the manifest, any file in the version folder the
manifest does not list, and ONNX external data outside the listed files
(:mod:`headrace.models.repository.integrity`). Anything that fails these checks raises
:class:`~headrace.client.errors.RepositoryError`.

Concurrency: a new version is claimed with an atomic ``mkdir`` and becomes visible only when
its manifest is renamed into place, so concurrent ``add`` calls never share a version and
readers never see half-copied files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from headrace.client.errors import ModelNotFoundError, RepositoryError
from headrace.models.repository.integrity import external_data_files
from headrace.models.repository.manifest import (
    CHUNK_BYTES,
    DEFAULT_MODEL_FILE,
    FORMATS,
    MANIFEST_FILE,
    POSTPROCESS,
    PREPROCESS,
    SCHEMA_VERSION,
    TORCH_FORMATS,
    VERSION_RE,
    FileEntry,
    IOSpec,
    Manifest,
    ManifestSummary,
    check_name,
    check_relpath,
    check_version,
    sha256_file,
)
from headrace.models.repository.reader import RepositoryReader

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_FILE", "FORMATS", "MANIFEST_FILE", "POSTPROCESS", "PREPROCESS", "SCHEMA_VERSION", "FileEntry",
    "IOSpec", "Manifest", "ManifestSummary", "ModelRepository", "check_name", "check_relpath", "check_version",
    "format_models_table", "sha256_file", "show_manifest",
]


class ModelRepository(RepositoryReader):
    """A model repository rooted at ``path`` (created if missing)."""

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"
    # --- writing ----------------------------------------------------------------------

    def add(self, name: str, files: Mapping[str, str | Path], *, format: str, inputs: Sequence[IOSpec],
            outputs: Sequence[IOSpec], precision: str = "fp32", backend: str = "", batch_dim: int = 0,
            max_batch: int = 0, preprocess: str = "none", postprocess: str = "none", model_file: str = "",
            source: str = "", recipe: Sequence[Mapping[str, Any]] = (), measured: Mapping[str, Any] | None = None,
            extra: Mapping[str, Any] | None = None, description: str = "",
            version: str | int | None = None) -> Manifest:
        """Copy ``files`` (relative name in the version folder -> source path) into a new
        version and write its manifest with checksums.

        Args:
            version: explicit version; None = one past the highest existing.
            (other arguments: the :class:`Manifest` fields.)

        Returns:
            The written manifest.

        Raises:
            RepositoryError: unsafe name/paths, a missing source file, an existing explicit
                version, invalid manifest fields, or an I/O failure.
        """
        check_name(name)
        if not files:
            raise RepositoryError("add() needs at least one file")
        rels = {str(check_relpath(rel)): Path(src) for rel, src in files.items()}
        for rel, src in rels.items():
            if not src.is_file():
                raise RepositoryError(f"source file for {rel!r} not found: {src}")
        fmt = format
        if fmt == "onnx":
            rels.update(external_data_files(rels, model_file or DEFAULT_MODEL_FILE[fmt]))
        if fmt not in FORMATS:
            raise RepositoryError(f"format {fmt!r} must be one of {sorted(FORMATS)}")
        base = Manifest(
            name=name, version="1", format=fmt, backend=backend or ("torch" if fmt in TORCH_FORMATS else "onnxruntime"),
            precision=precision, inputs=tuple(inputs), outputs=tuple(outputs), batch_dim=batch_dim,
            max_batch=max_batch, preprocess=preprocess, postprocess=postprocess,
            model_file=model_file or DEFAULT_MODEL_FILE[fmt], source=source,
            recipe=tuple(dict(s) for s in recipe), measured=dict(measured or {}), extra=dict(extra or {}),
            description=description)
        # Validate before touching the disk (files are filled in after the copy).
        replace(base, files=tuple(FileEntry(r, "0" * 64, 0) for r in rels)).validate()
        _check_json(base.to_dict())

        vdir = self._claim_version(name, version)
        try:
            entries = [self._copy_in(src, vdir, rel) for rel, src in sorted(rels.items())]
            m = replace(base, version=vdir.name, files=tuple(entries),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _atomic_write(vdir / MANIFEST_FILE, m.to_json())
        except BaseException:
            shutil.rmtree(vdir, ignore_errors=True)
            raise
        log.info("added %s/%s to %s (%d files, %d bytes)", name, m.version, self.root, len(entries), m.size_bytes)
        return m

    def _claim_version(self, name: str, version: str | int | None) -> Path:
        # mkdir is atomic: two concurrent add() calls can never both get the same version,
        # even though both computed "latest + 1" from the same listing.
        mdir = self.root / name
        mdir.mkdir(parents=True, exist_ok=True)
        self._inside(mdir)
        if version is not None:
            vdir = self.path(name, version)
            try:
                vdir.mkdir()
            except FileExistsError as e:
                raise RepositoryError(f"{name}/{vdir.name} already exists; versions are immutable") from e
            return vdir
        taken = [int(c.name) for c in mdir.iterdir() if VERSION_RE.match(c.name)]
        nxt = max(taken, default=0) + 1
        for _ in range(1000):
            try:
                (mdir / str(nxt)).mkdir()
                return mdir / str(nxt)
            except FileExistsError:
                nxt += 1
        raise RepositoryError(f"could not claim a new version of {name} (concurrent writers?)")

    def _copy_in(self, src: Path, vdir: Path, rel: str) -> FileEntry:
        dst = vdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        self._inside(dst.parent, vdir)
        h = hashlib.sha256()
        size = 0
        try:
            with src.open("rb") as fin, dst.open("xb") as fout:
                while chunk := fin.read(CHUNK_BYTES):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
        except OSError as e:
            raise RepositoryError(f"cannot copy {src} to {dst}: {e}") from e
        return FileEntry(path=rel, sha256=h.hexdigest(), size_bytes=size)

    def update_measured(self, name: str, version: str | int, measured: Mapping[str, Any]) -> Manifest:
        """Merge ``measured`` into the manifest's ``measured`` dict (keys overwrite).

        Raises:
            ModelNotFoundError: no such version. RepositoryError: values not JSON-able.
        """
        _check_json(dict(measured))
        vdir = self.path(name, version)
        with self._lock(vdir):
            # Read-modify-write under an flock: two benchmark processes recording figures
            # at once would otherwise each write back a manifest missing the other's keys.
            m = self.load_manifest(name, version)
            m = replace(m, measured={**m.measured, **dict(measured)})
            _atomic_write(vdir / MANIFEST_FILE, m.to_json())
        return m

    def remove(self, name: str, version: str | int) -> None:
        """Delete one version folder.

        Raises:
            ModelNotFoundError: no such version.
        """
        vdir = self.path(name, version)
        if not vdir.is_dir():
            raise ModelNotFoundError(f"{name}/{version} is not in {self.root}")
        shutil.rmtree(vdir)

    @contextlib.contextmanager
    def _lock(self, vdir: Path) -> Iterator[None]:
        if not vdir.is_dir():
            raise ModelNotFoundError(f"{vdir} does not exist")
        lock_path = vdir.parent / f".{vdir.name}.lock"
        with lock_path.open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def format_models_table(repo: ModelRepository | str | Path) -> Any:
    """A rich ``Table`` of every model version (see :mod:`headrace.models.repository.view`)."""
    from headrace.models.repository.view import format_models_table as render

    return render(repo)


def show_manifest(repo: ModelRepository | str | Path, name: str, version: str | int | None = None) -> Any:
    """A rich renderable of one manifest (see :mod:`headrace.models.repository.view`).

    Raises:
        ModelNotFoundError: no such model/version. RepositoryError: malformed manifest.
    """
    from headrace.models.repository.view import show_manifest as render

    return render(repo, name, version)


def _check_json(d: Mapping[str, Any]) -> None:
    try:
        json.dumps(d, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RepositoryError(f"manifest values must be plain JSON (no NaN, no objects): {e}") from e


def _atomic_write(path: Path, text: str) -> None:
    # The temporary file lives next to the version folder, not in it: a reader verifying the
    # version meanwhile must never see a file the manifest does not list.
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=path.parent.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
