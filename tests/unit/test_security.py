"""Security properties that need no services: no pickle anywhere on the wire or in the
model repository format, bounded msgpack decoding, and a worker's model loading refusing
files outside the repository, files that do not match their checksums, and pickles.

(Redis ACL users and TLS are tested against a real server in
``tests/integration/test_acl.py`` and ``test_tls.py``; the repository's own path and
checksum rules in ``tests/unit/test_repository.py``.)
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle  # noqa: S403 - only to build a malicious payload that must never be loaded
from pathlib import Path

import msgpack
import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client import protocol as P
from headrace.workers.backends import load_servable
from headrace.workers.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("client", "workers", "models", "cluster", "benchmarks", "scripts")

# Modules that (de)serialise arbitrary Python objects: loading their output runs code.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                  "ray.cloudpickle", "torch.serialization"}
# Calls that unpickle (or write pickles others would unpickle), by their dotted name.
PICKLE_CALLS = {"torch.load", "torch.save", "torch.jit.load", "pd.read_pickle", "pandas.read_pickle",
                "yaml.load", "yaml.unsafe_load", "np.load", "numpy.load"}
# The TorchScript format (issue 12) is read with torch.jit.load, whose C++ unpickler resolves
# only tensor/TorchScript globals (no Python callable): allowed in exactly the two places that
# load that format; test_a_pickle_in_the_repository_is_never_executed[torchscript] holds it to that.
ALLOWED_CALLS = {("models/importers/torch.py", "torch.jit.load"), ("workers/backends/torch_backend.py",
                                                                   "torch.jit.load")}


def _sources() -> list[Path]:
    out: list[Path] = []
    for pkg in PACKAGES:
        base = ROOT / pkg
        if base.is_dir():
            out += [p for p in base.rglob("*.py") if ".venv" not in p.parts and "node_modules" not in p.parts]
    return sorted(out)


def _dotted(node: ast.AST) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _import_problems(node: ast.AST, rel: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [f"{rel}:{node.lineno} import {a.name}" for a in node.names if a.name in PICKLE_MODULES]
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module in PICKLE_MODULES or any(f"{node.module}.{a.name}" in PICKLE_MODULES | PICKLE_CALLS
                                                for a in node.names):
            return [f"{rel}:{node.lineno} from {node.module} import ..."]
    return []


def _call_problems(node: ast.Call, rel: Path) -> list[str]:
    name = _dotted(node.func)
    if name in {"np.load", "numpy.load"}:
        # numpy refuses pickles by default; it must never be switched on.
        flag = _kw(node, "allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            return [f"{rel}:{node.lineno} {name}(allow_pickle=...)"]
    elif name in {"yaml.load"}:
        loader = _kw(node, "Loader")
        if loader is None or "Safe" not in _dotted(loader):
            return [f"{rel}:{node.lineno} yaml.load without SafeLoader"]
    elif name in PICKLE_CALLS and (str(rel), name) not in ALLOWED_CALLS:
        return [f"{rel}:{node.lineno} {name}()"]
    elif name.endswith("unpackb") or name.endswith("Unpacker"):
        hooks = {"object_hook", "object_pairs_hook", "list_hook", "ext_hook"} & {k.arg for k in node.keywords}
        if hooks:
            return [f"{rel}:{node.lineno} msgpack decoding with hooks {sorted(hooks)}"]
    return []


def test_no_pickle_anywhere_in_the_code() -> None:
    files = _sources()
    assert len(files) > 30, "the scan must see the package sources"
    problems: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            problems += _call_problems(node, rel) if isinstance(node, ast.Call) else _import_problems(node, rel)
    assert not problems, "pickle-capable code paths:\n" + "\n".join(problems)


def test_wire_decoding_is_msgpack_with_limits_and_no_extension_types() -> None:
    # An ext type (msgpack's hook for custom objects) is refused outright, and every length
    # cap is in force before any allocation.
    fields = {b"v": b"1", b"id": b"r", b"reply_to": b"k",
              b"body": msgpack.packb({"inputs": {"x": msgpack.ExtType(1, b"\0" * 16)}}, use_bin_type=True)}
    with pytest.raises(E.DecodeError):
        P.decode_request(fields)
    limits = WorkerSettings(max_payload_bytes=2048).limits
    assert limits.max_payload_bytes == 2048
    big = {**fields, b"body": msgpack.packb({"text": "a" * 3000})}
    with pytest.raises(E.PayloadTooLargeError):
        P.decode_request(big, limits)
    # A 5-byte array header claiming 4 Gi elements is refused without allocating them.
    with pytest.raises(E.ProtocolError):
        P.decode_request({**fields, b"body": b"\xdd\xff\xff\xff\xff"})


def test_encoded_requests_and_results_are_plain_msgpack() -> None:
    # Nothing a producer or worker writes can carry an object for the other side to rebuild.
    req = P.encode_request(P.Request(P.Envelope("r", "k"), inputs={"x": np.ones(3, np.float32)}))
    res = P.encode_result(P.Result("r", P.STATUS_OK, {"y": np.ones(2)}))
    for body in (req[b"body"], res[b"body"]):
        assert b"\x80\x04" not in body[:2] and not body.startswith(b"\x80")  # no pickle protocol header
        obj = msgpack.unpackb(body, raw=False, ext_hook=_no_ext)
        assert isinstance(obj, dict)


def _no_ext(code: int, data: bytes) -> None:
    raise AssertionError(f"unexpected msgpack extension type {code}")


# --- the model repository, through the worker's own loading path --------------------------


def _onnx_model(path: Path) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "ident", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path.read_bytes()


def _manifest(folder: Path, name: str, files: dict[str, bytes], **extra: object) -> None:
    doc: dict[str, object] = {
        "name": name, "version": folder.name, "format": "onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [3]}],
        "files": [{"path": p, "sha256": hashlib.sha256(d).hexdigest(), "size_bytes": len(d)} for p, d in files.items()],
    }
    doc.update(extra)
    (folder / "manifest.json").write_text(json.dumps(doc))


def _settings(repo: Path, model: str) -> WorkerSettings:
    return WorkerSettings(model=model, model_repo=str(repo))


def test_worker_loads_a_clean_repository_entry(tmp_path: Path) -> None:
    # The control for the refusals below: the same layout, untampered, serves.
    folder = tmp_path / "repo" / "ident" / "1"
    folder.mkdir(parents=True)
    data = _onnx_model(folder / "model.onnx")
    _manifest(folder, "ident", {"model.onnx": data})
    s = load_servable(_settings(tmp_path / "repo", "ident"))
    out = s.infer([P.Request(P.Envelope("r", "k"), inputs={"x": np.arange(3, dtype=np.float32)})])
    np.testing.assert_array_equal(out[0]["y"], [0, 1, 2])


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_worker_refuses_model_files_outside_the_repository(tmp_path: Path, how: str) -> None:
    # The attacker controls the manifest, so the checksums match the outside file: only the
    # path rules stand between a manifest and loading /anything/ on the worker's disk.
    repo = tmp_path / "repo"
    folder = repo / "evil" / "1"
    folder.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    data = _onnx_model(outside / "model.onnx")
    if how == "dotdot":
        _manifest(folder, "evil", {"../../../outside/model.onnx": data}, model_file="../../../outside/model.onnx")
    elif how == "absolute":
        path = str(outside / "model.onnx")
        _manifest(folder, "evil", {path: data}, model_file=path)
    elif how == "symlink_file":
        os.symlink(outside / "model.onnx", folder / "model.onnx")
        _manifest(folder, "evil", {"model.onnx": data})
    else:
        os.symlink(outside, folder / "sub")
        _manifest(folder, "evil", {"sub/model.onnx": data}, model_file="sub/model.onnx")
    with pytest.raises(E.RepositoryError):
        load_servable(_settings(repo, "evil"))


def test_worker_refuses_a_file_whose_checksum_does_not_match(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "ident" / "1"
    folder.mkdir(parents=True)
    data = _onnx_model(folder / "model.onnx")
    _manifest(folder, "ident", {"model.onnx": data})
    swapped = bytearray(data)
    swapped[-1] ^= 0xFF  # same size, one bit pattern changed
    (folder / "model.onnx").write_bytes(bytes(swapped))
    with pytest.raises(E.RepositoryError, match="checksum"):
        load_servable(_settings(tmp_path / "repo", "ident"))


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _torchscript_with(payload: bytes, tmp_path: Path) -> bytes:
    """A real TorchScript archive whose ``data.pkl`` (the module's state) is ``payload``."""
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, payload if item.filename.endswith("/data.pkl") else src.read(item))
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["torch", "onnx", "torchscript", "pt2"])
def test_a_pickle_in_the_repository_is_never_executed(tmp_path: Path, fmt: str) -> None:
    # A correctly checksummed pickle where the weights should be: loading must fail as a
    # headrace error without ever unpickling (no torch.load, no pickle anywhere).
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    folder = tmp_path / "repo" / "bad" / "1"
    folder.mkdir(parents=True)
    if fmt == "torch":
        cfg = json.dumps({"hidden": 8}).encode()
        (folder / "model.safetensors").write_bytes(payload)
        (folder / "minilm_config.json").write_bytes(cfg)
        _manifest(folder, "bad", {"model.safetensors": payload, "minilm_config.json": cfg}, format="torch",
                  model_file="model.safetensors", extra={"arch": "minilm"})
    elif fmt in ("torchscript", "pt2"):
        # TorchScript reads pickle protocol 2 only: give it one, so its unpickler meets the global.
        data = _torchscript_with(pickle.dumps(_Payload(marker), protocol=2), tmp_path) if fmt == "torchscript" \
            else payload
        name = "model.pt" if fmt == "torchscript" else "model.pt2"
        (folder / name).write_bytes(data)
        _manifest(folder, "bad", {name: data}, format=fmt, model_file=name)
    else:
        (folder / "model.onnx").write_bytes(payload)
        _manifest(folder, "bad", {"model.onnx": payload})
    with pytest.raises(E.HeadraceError):
        load_servable(_settings(tmp_path / "repo", "bad"))
    assert not marker.exists(), "the pickle payload ran"
