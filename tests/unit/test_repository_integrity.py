"""Every file of a version folder is listed and checksummed (issue #10, item 5): a real ONNX
model with external data, an unlisted ``weights.bin`` dropped next to it, stray files and
symlinks, and external data that points out of the folder are all refused, by ``verify``
and by the worker's own loading path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from headrace.client.errors import RepositoryError
from headrace.client.protocol import Envelope, Request
from headrace.models.repository.integrity import onnx_external_locations
from headrace.models.repository.store import MANIFEST_FILE, IOSpec, Manifest, ModelRepository
from headrace.workers.backends.loader import load_servable
from headrace.workers.settings import WorkerSettings

pytestmark = pytest.mark.timeout(60)
W = np.arange(8, dtype=np.float32).reshape(4, 2)


def external_model(folder: Path, weights: np.ndarray, location: str = "weights.bin") -> Path:
    """``y = x @ W`` as ONNX, W kept as external data in ``folder/location``."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def add(repo: ModelRepository, src: Path) -> Manifest:
    """Only model.onnx is given: add() takes the external data along by itself."""
    return repo.add("mm", {"model.onnx": src}, format="onnx", inputs=[IOSpec("x", "float32", (4,))],
                    outputs=[IOSpec("y", "float32", (2,))])


def run(repo: ModelRepository) -> np.ndarray:
    servable = load_servable(WorkerSettings(model="mm", model_repo=str(repo.root), intra_op_threads=1))
    x = np.ones(4, np.float32)
    return np.asarray(servable.infer([Request(Envelope("r", "q"), inputs={"x": x})])[0]["y"])


def drop_from_manifest(repo: ModelRepository, m: Manifest, rel: str) -> None:
    """A manifest that does not list ``rel`` (as written by a tool that forgot it)."""
    path = repo.path(m.name, m.version) / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw["files"] = [f for f in raw["files"] if f["path"] != rel]
    path.write_text(json.dumps(raw))


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def test_add_lists_and_checksums_the_external_data(repo: ModelRepository, tmp_path: Path) -> None:
    m = add(repo, external_model(tmp_path / "src", W))
    assert sorted(f.path for f in m.files) == ["model.onnx", "weights.bin"]
    assert onnx_external_locations(repo.file_path(m, "model.onnx")) == ["weights.bin"]
    assert repo.verify("mm") == m
    np.testing.assert_array_equal(run(repo), np.ones(4, np.float32) @ W)


def test_an_unlisted_weights_file_refuses_the_load(repo: ModelRepository, tmp_path: Path) -> None:
    """The attack: a manifest that lists only model.onnx, and a different weights.bin dropped
    into the folder. verify() passed and the outputs changed; now both refuse."""
    m = add(repo, external_model(tmp_path / "src", W))
    drop_from_manifest(repo, m, "weights.bin")
    evil = external_model(tmp_path / "evil", W * 100).parent / "weights.bin"
    (repo.path("mm", m.version) / "weights.bin").write_bytes(evil.read_bytes())
    with pytest.raises(RepositoryError, match="'weights.bin' in the version folder is not listed"):
        repo.verify("mm")
    with pytest.raises(RepositoryError, match="not listed"):
        run(repo)


@pytest.mark.parametrize("stray", ["notes.txt", "sub/extra.bin", ".hidden"])
def test_any_unlisted_file_is_refused(repo: ModelRepository, tmp_path: Path, stray: str) -> None:
    m = add(repo, external_model(tmp_path / "src", W))
    target = repo.path("mm", m.version) / stray
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("x")
    with pytest.raises(RepositoryError, match=f"'{stray}'"):
        repo.verify("mm")
    target.unlink()
    assert repo.verify("mm") == m  # an empty leftover folder holds nothing to load


def test_unlisted_symlinks_are_refused_even_to_listed_files(repo: ModelRepository, tmp_path: Path) -> None:
    m = add(repo, external_model(tmp_path / "src", W))
    vdir = repo.path("mm", m.version)
    os.symlink(vdir / "weights.bin", vdir / "alias.bin")
    os.symlink(tmp_path / "src", vdir / "linked-dir")
    with pytest.raises(RepositoryError, match="'alias.bin', 'linked-dir'"):
        repo.verify("mm")


def test_external_data_outside_the_folder_is_refused(repo: ModelRepository, tmp_path: Path) -> None:
    m = add(repo, external_model(tmp_path / "src", W))
    other = add(repo, external_model(tmp_path / "src2", W * 3))  # version 2, a neighbour
    path = repo.file_path(m, "model.onnx")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = f"../{other.version}/weights.bin"
    onnx.save_model(model, str(path))
    drop_from_manifest(repo, m, "model.onnx")  # keep the checksum question out of the way:
    raw = json.loads((repo.path("mm", m.version) / MANIFEST_FILE).read_text())
    raw["files"].append({"path": "model.onnx", "sha256": _sha(path), "size_bytes": path.stat().st_size})
    (repo.path("mm", m.version) / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(RepositoryError, match="outside its version folder"):
        repo.verify("mm", m.version)


def test_the_manifest_update_never_leaves_a_temporary_file_in_the_folder(repo: ModelRepository,
                                                                       tmp_path: Path) -> None:
    m = add(repo, external_model(tmp_path / "src", W))
    repo.update_measured("mm", m.version, {"x": 1})
    assert sorted(p.name for p in repo.path("mm", m.version).iterdir()) == [MANIFEST_FILE, "model.onnx",
                                                                            "weights.bin"]
    assert repo.verify("mm").measured == {"x": 1}


def _sha(path: Path) -> str:
    from headrace.models.repository.manifest import sha256_file

    return sha256_file(path)
