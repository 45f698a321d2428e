"""Model repository: versions, manifests, checksums, and refusal of paths that escape."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from rich.console import Console

from headrace.client.errors import ModelNotFoundError, RepositoryError
from headrace.models.repository.store import MANIFEST_FILE, IOSpec, Manifest, ModelRepository
from headrace.models.repository.view import format_models_table, show_manifest

X = [IOSpec("x", "float32", (4,))]
Y = [IOSpec("y", "float32", (2,))]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "src"
    p.mkdir()
    (p / "model.onnx").write_bytes(b"fake onnx bytes")
    (p / "vocab.txt").write_text("a\nb\n")
    return p


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def add(repo: ModelRepository, src: Path, name: str = "m", **kw) -> Manifest:  # type: ignore[no-untyped-def]
    return repo.add(name, {"model.onnx": src / "model.onnx"}, format="onnx", inputs=X, outputs=Y, **kw)


def test_add_versions_latest_and_load(repo: ModelRepository, src: Path) -> None:
    m1 = add(repo, src, recipe=[{"step": "export", "params": {"opset": 17}}], measured={"params": 10})
    m2 = repo.add("m", {"model.onnx": src / "model.onnx", "assets/vocab.txt": src / "vocab.txt"},
                  format="onnx", inputs=X, outputs=Y, precision="int8")
    assert (m1.version, m2.version) == ("1", "2")
    assert repo.versions("m") == ["1", "2"] and repo.latest("m") == "2"
    loaded = repo.load_manifest("m")
    assert loaded == m2 and loaded.precision == "int8"
    assert repo.load_manifest("m", 1).recipe == ({"step": "export", "params": {"opset": 17}},)
    assert (repo.path("m", 2) / "assets" / "vocab.txt").read_text() == "a\nb\n"
    raw = json.loads((repo.path("m", 1) / MANIFEST_FILE).read_text())
    assert raw["files"][0]["sha256"] == m1.files[0].sha256 and len(raw["files"][0]["sha256"]) == 64
    assert [(s.name, s.version) for s in repo.list()] == [("m", "1"), ("m", "2")]
    assert repo.verify("m", "2") == m2


def test_versions_sort_numerically_and_explicit_version(repo: ModelRepository, src: Path) -> None:
    add(repo, src, version=9)
    add(repo, src, version="10")
    assert repo.versions("m") == ["9", "10"] and repo.latest("m") == "10"
    assert add(repo, src).version == "11"
    with pytest.raises(RepositoryError):
        add(repo, src, version=10)
    with pytest.raises(RepositoryError):
        add(repo, src, version="01")


def test_update_measured_merges(repo: ModelRepository, src: Path) -> None:
    add(repo, src, measured={"params": 5, "throughput": 1.0})
    m = repo.update_measured("m", "1", {"throughput": 250.0, "fidelity": {"min_cosine": 0.99}})
    assert m.measured == {"params": 5, "throughput": 250.0, "fidelity": {"min_cosine": 0.99}}
    assert repo.load_manifest("m", "1").measured == m.measured
    with pytest.raises(RepositoryError):
        repo.update_measured("m", "1", {"bad": float("nan")})
    with pytest.raises(ModelNotFoundError):
        repo.update_measured("m", "7", {"a": 1})


def test_unknown_model_and_version(repo: ModelRepository, src: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        repo.latest("nope")
    add(repo, src)
    with pytest.raises(ModelNotFoundError):
        repo.load_manifest("m", "2")
    assert repo.versions("nope") == []


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "", "x" * 129, "sp ace", "a\x00b"])
def test_refuses_unsafe_names(repo: ModelRepository, src: Path, name: str) -> None:
    with pytest.raises(RepositoryError):
        add(repo, src, name=name)
    with pytest.raises((RepositoryError, ModelNotFoundError)):
        repo.load_manifest(name)


@pytest.mark.parametrize("rel", ["../evil.onnx", "/etc/passwd", "a/../../x", "a\\b", "./x", "manifest.json", ""])
def test_refuses_file_paths_escaping(repo: ModelRepository, src: Path, rel: str) -> None:
    with pytest.raises(RepositoryError):
        repo.add("m", {rel: src / "model.onnx"}, format="onnx", inputs=X, outputs=Y)
    assert repo.versions("m") == []


def test_refuses_manifest_paths_escaping(repo: ModelRepository, src: Path, tmp_path: Path) -> None:
    add(repo, src)
    mpath = repo.path("m", 1) / MANIFEST_FILE
    doc = json.loads(mpath.read_text())
    (tmp_path / "secret").write_text("outside")
    doc["files"].append({"path": "../../secret", "sha256": "0" * 64, "size_bytes": 7})
    mpath.write_text(json.dumps(doc))
    with pytest.raises(RepositoryError, match="escapes"):
        repo.load_manifest("m", 1)


def test_refuses_symlink_pointing_outside(repo: ModelRepository, src: Path, tmp_path: Path) -> None:
    m = add(repo, src)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"fake onnx bytes")  # same content: only the symlink check can catch it
    target = repo.path("m", 1) / "model.onnx"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(RepositoryError, match="outside"):
        repo.verify("m", 1)
    with pytest.raises(RepositoryError):
        repo.file_path(m, "model.onnx")


def test_refuses_symlinked_version_folder_outside(repo: ModelRepository, src: Path, tmp_path: Path) -> None:
    add(repo, src)
    elsewhere = tmp_path / "elsewhere"
    os.rename(repo.path("m", 1), elsewhere)
    repo.path("m", 1).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RepositoryError, match="outside"):
        repo.load_manifest("m", 1)


def test_checksum_and_size_mismatch_refused(repo: ModelRepository, src: Path) -> None:
    add(repo, src)
    f = repo.path("m", 1) / "model.onnx"
    f.write_bytes(b"FAKE onnx bytes")  # same size, different content
    with pytest.raises(RepositoryError, match="checksum"):
        repo.verify("m", 1)
    f.write_bytes(b"short")
    with pytest.raises(RepositoryError, match="bytes"):
        repo.verify("m", 1)
    f.unlink()
    with pytest.raises(RepositoryError, match="missing"):
        repo.verify("m", 1)


def test_malformed_manifests(repo: ModelRepository, src: Path) -> None:
    add(repo, src)
    mpath = repo.path("m", 1) / MANIFEST_FILE
    good = json.loads(mpath.read_text())
    cases = [
        "not json",
        json.dumps({**good, "format": "pickle"}),
        json.dumps({**good, "name": "other"}),
        json.dumps({**good, "inputs": [{"name": "x", "dtype": "complex64", "shape": [4]}]}),
        json.dumps({k: v for k, v in good.items() if k != "outputs"}),
        json.dumps({**good, "surprise": 1}),
        json.dumps({**good, "model_file": "missing.onnx"}),
    ]
    for text in cases:
        mpath.write_text(text)
        with pytest.raises(RepositoryError):
            repo.load_manifest("m", 1)
    assert repo.list() == []  # skipped with a warning, not raised


def test_concurrent_adds_get_distinct_versions(repo: ModelRepository, src: Path) -> None:
    got: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        v = add(repo, src).version
        with lock:
            got.append(v)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=int) == [str(i) for i in range(1, 7)]
    for v in got:
        repo.verify("m", v)


def test_add_validates_before_writing(repo: ModelRepository, src: Path) -> None:
    with pytest.raises(RepositoryError):
        add(repo, src, preprocess="magic")
    with pytest.raises(RepositoryError):
        repo.add("m", {"model.onnx": src / "missing"}, format="onnx", inputs=X, outputs=Y)
    with pytest.raises(RepositoryError):
        add(repo, src, measured={"x": object()})
    assert repo.versions("m") == []


def test_tables_render(repo: ModelRepository, src: Path) -> None:
    add(repo, src, recipe=[{"step": "quantize", "params": {"mode": "dynamic"}}],
        measured={"throughput": 123.0, "fidelity": {"min_cosine": 0.998}})
    console = Console(width=200, record=True)
    console.print(format_models_table(repo))
    console.print(show_manifest(repo, "m"))
    out = console.export_text()
    assert "quantize" in out and "123/s" in out and "min_cosine=0.9980" in out
    assert "model.onnx" in out and "float32" in out


def test_find_build_ignores_tampered_cache(repo: ModelRepository, src: Path) -> None:
    from headrace.models.builtin.build import find_build

    add(repo, src, extra={"build_key": "k1"})
    add(repo, src, extra={"build_key": "k2"})
    assert find_build(repo, "m", "k1").version == "1"  # type: ignore[union-attr]
    assert find_build(repo, "m", "k3") is None
    (repo.path("m", 1) / "model.onnx").write_bytes(b"tampered bytes!")
    assert find_build(repo, "m", "k1") is None  # a build is only reused if its files verify
