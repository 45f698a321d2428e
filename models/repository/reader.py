"""Reading a model repository: safe paths, the models and versions it holds, and manifests
loaded and verified against the files on disk.

:class:`RepositoryReader` never writes below the root (it only creates the root itself);
:class:`~headrace.models.repository.store.ModelRepository` adds new versions on top of it.
Every path it hands out stays inside the repository, and :meth:`RepositoryReader.verify`
refuses files whose checksum or size differ from the manifest
(:mod:`headrace.models.repository.integrity`).
"""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

from headrace.client.errors import ModelNotFoundError, RepositoryError
from headrace.models.repository.integrity import check_external_data, check_folder, external_locations
from headrace.models.repository.manifest import (
    MANIFEST_FILE,
    NAME_RE,
    VERSION_RE,
    Manifest,
    ManifestSummary,
    check_name,
    check_relpath,
    check_version,
    sha256_file,
)

log = logging.getLogger(__name__)


class RepositoryReader:
    """The read side of a model repository rooted at ``path`` (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RepositoryError(f"cannot create model repository at {self.root}: {e}") from e
        self._real_root = self.root.resolve()

    # --- paths ------------------------------------------------------------------------

    def _inside(self, p: Path, base: Path | None = None) -> Path:
        """Resolve ``p`` (following symlinks) and require it to stay under ``base``."""
        real = p.resolve()
        anchor = (base or self._real_root).resolve()
        if real != anchor and anchor not in real.parents:
            raise RepositoryError(f"{p} resolves to {real}, outside {anchor}; refusing to follow it")
        return real

    def path(self, name: str, version: str | int) -> Path:
        """Folder of ``name``/``version`` (need not exist).

        Raises:
            RepositoryError: the name or version is unsafe, or an existing folder (symlink)
                leads outside the repository.
        """
        p = self.root / check_name(name) / check_version(version)
        self._inside(p)
        return p

    def file_path(self, manifest: Manifest, rel: str) -> Path:
        """Absolute path of a manifest file, refusing paths or symlinks that leave the version folder.

        Raises:
            RepositoryError: unsafe path, or not listed in the manifest.
        """
        manifest.file(rel)
        vdir = self.path(manifest.name, manifest.version)
        target = vdir / check_relpath(rel)
        return self._inside(target, vdir)

    # --- reading ----------------------------------------------------------------------

    def names(self) -> list[str]:
        """Model names that have at least one version."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and NAME_RE.match(d.name) and d.name not in {".", ".."} and self.versions(d.name):
                out.append(d.name)
        return out

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` that have a manifest, ascending; [] if none."""
        d = self.root / check_name(name)
        if not d.is_dir():
            return []
        vs = [c.name for c in d.iterdir() if VERSION_RE.match(c.name) and (c / MANIFEST_FILE).is_file()]
        return sorted(vs, key=int)

    def latest(self, name: str) -> str:
        """Highest version of ``name``.

        Raises:
            ModelNotFoundError: no version of ``name`` in the repository.
        """
        vs = self.versions(name)
        if not vs:
            folder = self.root / check_name(name)
            bare = sorted(str(c.relative_to(self.root)) for c in folder.glob("*") if c.is_dir()) \
                if folder.is_dir() else []
            hint = (f"; {bare} hold no {MANIFEST_FILE}: add a model with `headrace models add {name} FILE`, "
                    f"which writes the manifest and checksums" if bare else
                    f"; add one with `headrace models add {name} FILE`")
            raise ModelNotFoundError(f"model {name!r} is not in the repository {self.root}; "
                                     f"available: {self.names() or 'none'}{hint}")
        return vs[-1]

    def load_manifest(self, name: str, version: str | int | None = None) -> Manifest:
        """Read and validate ``<name>/<version>/manifest.json`` (``version`` None or "" = latest).

        Raises:
            ModelNotFoundError: no such model or version.
            RepositoryError: the manifest is malformed, unsafe, or names another model/version.
        """
        v = self.latest(name) if version in (None, "") else check_version(version)  # type: ignore[arg-type]
        vdir = self.path(name, v)
        mpath = vdir / MANIFEST_FILE
        if not mpath.is_file():
            raise ModelNotFoundError(f"model {name!r} has no version {v!r} in {self.root}; "
                                     f"versions: {self.versions(name) or 'none'}")
        self._inside(mpath, vdir)
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RepositoryError(f"cannot read {mpath}: {e}") from e
        m = Manifest.from_dict(data)
        if (m.name, m.version) != (name, v):
            raise RepositoryError(f"{mpath} describes {m.name}/{m.version}, not {name}/{v}")
        return m

    def verify(self, name: str, version: str | int | None = None) -> Manifest:
        """Check the version folder holds exactly the listed files (plus the manifest), each
        inside the folder with the listed size and sha256, and that an ONNX model keeps its
        external data only in listed files.

        Returns the manifest.

        Raises:
            ModelNotFoundError: no such model or version.
            RepositoryError: a file is missing, unlisted, escapes the folder (path or
                symlink), its checksum or size does not match, or an ONNX graph names
                external data that is not a listed file.
        """
        m = self.load_manifest(name, version)
        if not m.files:
            raise RepositoryError(f"{name}/{m.version}: the manifest lists no files")
        check_folder(self.path(name, m.version), m)
        for entry in m.files:
            p = self.file_path(m, entry.path)
            if not p.is_file():
                raise RepositoryError(f"{name}/{m.version}: file {entry.path!r} is missing")
            size = p.stat().st_size
            if size != entry.size_bytes:
                raise RepositoryError(f"{name}/{m.version}: {entry.path!r} is {size} bytes, "
                                      f"manifest says {entry.size_bytes}; the file was changed or truncated")
            digest = sha256_file(p)
            if digest != entry.sha256:
                raise RepositoryError(f"{name}/{m.version}: checksum mismatch for {entry.path!r} "
                                      f"(sha256 {digest[:12]}..., manifest {entry.sha256[:12]}...); "
                                      f"refusing to load a modified file")
        if m.format == "onnx":
            locations = external_locations(self.file_path(m, m.model_file))
            check_external_data(locations or [], m)
        return m

    # Defined last: inside the class body the name "list" would shadow the builtin in annotations.
    def list(self) -> builtins.list[ManifestSummary]:
        """Every valid version of every model, by name then version. Malformed entries are
        skipped with a warning (``verify`` reports them)."""
        out: builtins.list[ManifestSummary] = []
        for name in self.names():
            for v in self.versions(name):
                try:
                    out.append(ManifestSummary.of(self.load_manifest(name, v)))
                except RepositoryError as e:
                    log.warning("skipping %s/%s: %s", name, v, e)
        return out
