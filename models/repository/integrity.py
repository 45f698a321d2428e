"""What a version folder may hold: exactly the files its manifest lists (plus the manifest).

A runtime may open more than the manifest's ``model_file``: ONNX Runtime reads the tensors
an ONNX graph keeps as *external data* from files named inside the graph, relative to the
model's folder. A file nobody listed is therefore never harmless: a dropped ``weights.bin``
would change the outputs of a model whose listed files all verify. So every file in a
version folder must be listed with its checksum, and every external-data file an ONNX graph
names must be one of them (never a path that leaves the folder).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from headrace.client.errors import RepositoryError
from headrace.models.repository.manifest import MANIFEST_FILE, Manifest, check_relpath

log = logging.getLogger(__name__)


def folder_files(vdir: Path) -> list[str]:
    """Every non-directory entry under ``vdir`` (files, symlinks, fifos, ...), as relative
    POSIX paths, sorted. Symlinked directories count as entries and are not followed."""
    out: list[str] = []
    for root, dirs, files in os.walk(vdir, followlinks=False):
        base = Path(root)
        linked = [d for d in dirs if (base / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in linked]
        out += [(base / name).relative_to(vdir).as_posix() for name in (*files, *linked)]
    return sorted(out)


def unlisted_files(vdir: Path, manifest: Manifest) -> list[str]:
    """Entries of ``vdir`` that are neither the manifest nor listed in it."""
    listed = {f.path for f in manifest.files} | {MANIFEST_FILE}
    return [rel for rel in folder_files(vdir) if rel not in listed]


def check_folder(vdir: Path, manifest: Manifest) -> None:
    """Refuse a version folder holding anything its manifest does not list.

    Raises:
        RepositoryError: naming the unlisted entries.
    """
    extra = unlisted_files(vdir, manifest)
    if extra:
        shown = ", ".join(repr(x) for x in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise RepositoryError(
            f"{manifest.name}/{manifest.version}: {shown} in the version folder "
            f"{'is' if len(extra) == 1 else 'are'} not listed in the manifest; every file of a version must be "
            "listed with its sha256 (a runtime may load it, e.g. ONNX external data). Remove it, or add the "
            "version again with it (`ModelRepository.add` lists every file it copies)")


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[Any]) -> Iterator[Any]:
    """Tensors held by node attributes (Constant values, ...), subgraphs (If, Loop) included."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _tensors(model: Any) -> Iterator[Any]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def onnx_external_locations(model_path: Path) -> list[str]:
    """The external-data file names an ONNX model refers to (graph only; the data itself is
    not read), sorted and unique.

    Raises:
        RepositoryError: the file is not a readable ONNX model.
        ImportError: the onnx package is not installed.
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for a broken file
        raise RepositoryError(f"{model_path.name} is not a readable ONNX model: {e}") from e
    found: set[str] = set()
    for t in _tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            found.add(info.get("location", ""))
    return sorted(found)


def check_external_data(locations: Iterable[str], manifest: Manifest) -> None:
    """Every external-data location (relative to the model file's folder) must be a listed
    file of the version, inside its folder.

    Raises:
        RepositoryError: a location that escapes the folder or is not listed.
    """
    listed = {f.path for f in manifest.files}
    base = PurePosixPath(manifest.model_file).parent
    for loc in locations:
        try:
            rel = (base / check_relpath(loc)).as_posix()
        except RepositoryError as e:
            raise RepositoryError(f"{manifest.name}/{manifest.version}: {manifest.model_file} keeps tensors in "
                                  f"{loc!r}, outside its version folder; refusing it ({e})") from e
        if rel not in listed:
            raise RepositoryError(f"{manifest.name}/{manifest.version}: {manifest.model_file} keeps tensors in "
                                  f"{loc!r}, which the manifest does not list with a checksum")


def external_locations(model_path: Path) -> list[str] | None:
    """The model's external-data locations; None when they cannot be read: the onnx package
    is missing, or the file does not parse as ONNX (then no runtime loads it either). The
    check is a second line: every file of the folder is listed and verified anyway, and ONNX
    Runtime >= 1.17 refuses external data outside the model's folder itself."""
    try:
        import onnx  # noqa: F401 - only probing that it is installed
    except ImportError:
        log.debug("onnx is not installed: skipping the external-data check of %s", model_path)
        return None
    try:
        return onnx_external_locations(model_path)
    except RepositoryError as e:
        log.debug("skipping the external-data check: %s", e)
        return None


def external_data_files(rels: Mapping[str, Path], model_file: str) -> dict[str, Path]:
    """The external-data files an ONNX ``model_file`` among ``rels`` names and ``rels`` lacks,
    taken from next to the source model (so a model with external data is added whole).

    Raises:
        RepositoryError: a location that leaves the folder, or a missing data file.
    """
    src = rels.get(model_file)
    if src is None:
        return {}
    out: dict[str, Path] = {}
    base = PurePosixPath(model_file).parent
    for loc in external_locations(src) or []:
        rel = (base / check_relpath(loc)).as_posix()
        if rel not in rels:
            data = src.parent / loc
            if not data.is_file():
                raise RepositoryError(f"{model_file} keeps tensors in {loc!r}, not found next to it: {data}")
            out[rel] = data
    return out
