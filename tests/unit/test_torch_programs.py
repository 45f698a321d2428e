"""Bringing your own torch program (``headrace models add`` of a TorchScript ``.pt`` or a
``torch.export`` ``.pt2``, served by the torch backend or converted with ``--to-onnx``):

* an ``--output`` dtype other than the program's is refused at ``add``, and a manifest edited
  to another dtype refuses to load: the worker never converts an output to the manifest's
  dtype (float32 cast to int64 truncates every value in silence);
* a ``.pt2`` program converts to ONNX;
* nested tuple outputs are flattened in order (as ``torch.onnx.export`` does); a dict's
  outputs are named by its keys, so naming them otherwise is refused, and a dict that lacks
  a key on some input is a model error, not a crash;
* float16 outputs stay float16 (a wire dtype);
* an ``--input`` naming no input of the program is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.client.errors import ModelError
from headrace.models.importers.common import ImportOptions, parse_io

torch = pytest.importorskip("torch", reason="the torch importer needs torch")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class IntOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 10).to(torch.int64)


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return x, (x * 2, x * 3)


class DictOut(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x * 2, "norm": (x * x).sum(-1)}


class VarKeys(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if bool((x < -100).any()):
            return {"other": x}
        return {"y": x * 2}


class Half(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.float() * 2).half(), x.sum(-1, keepdim=True).to(torch.float64)


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _pt2(module: torch.nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch")
    ep = torch.export.export(module, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path


def _opts(*outputs: str, example: dict[str, Any] | None = None, to_onnx: bool = False,
          inputs: tuple[str, ...] = ("x:float32:4",)) -> ImportOptions:
    return ImportOptions(inputs={s.name: s for s in map(parse_io, inputs)},
                         outputs={s.name: s for s in map(parse_io, outputs)}, example=example, to_onnx=to_onnx)


def _add(tmp_path: Path, name: str, src: Path, opts: ImportOptions, *, dry_run: bool = True) -> Any:
    from headrace.cluster.ops.add_model import add_model

    return add_model(tmp_path / "repo", name, src, opts, dry_run=dry_run)


X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32) * 5


@pytest.mark.parametrize("module,kind,flag,said,returns", [
    (Lin(), "torchscript", "y:int64:3", "int64", "float32"),
    (Lin(), "pt2", "y:int64:3", "int64", "float32"),
    (IntOut(), "torchscript", "y:float32:4", "float32", "int64"),
])
def test_an_output_dtype_other_than_the_programs_is_refused_at_add(tmp_path: Path, module: torch.nn.Module,
                                                                  kind: str, flag: str, said: str,
                                                                  returns: str) -> None:
    src = _script(module, tmp_path / "m.pt") if kind == "torchscript" else _pt2(module, tmp_path / "m.pt2")
    with pytest.raises(ModelError) as e:
        _add(tmp_path, "cast", src, _opts(flag, inputs=("x:float32:4",) if kind == "torchscript" else ()))
    assert f"--output 'y' says {said}; the program returns {returns}" in e.value.message, e.value.message
    assert not (tmp_path / "repo" / "cast").exists()


def test_a_manifest_with_another_output_dtype_refuses_to_load(tmp_path: Path) -> None:
    from headrace.models.repository.store import ModelRepository
    from headrace.workers.backends.loader import check_servable, servable_from_manifest

    src = _script(Lin(), tmp_path / "lin.pt")
    _add(tmp_path, "lin", src, _opts("y:float32:3"), dry_run=False)
    path = tmp_path / "repo" / "lin" / "1" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["outputs"][0]["dtype"] = "int64"
    path.write_text(json.dumps(doc))
    repo = ModelRepository(tmp_path / "repo")
    manifest = repo.load_manifest("lin")
    servable = servable_from_manifest(repo, manifest, intra_op_threads=1)
    try:
        with pytest.raises(ModelError) as e:
            check_servable(servable, repo, manifest)
        assert "output 'y': manifest says int64; the model returned float32" in e.value.message, e.value.message
        # Served directly, the request fails the same way: values are never truncated to ints.
        with pytest.raises(ModelError, match="manifest says int64; the model returned float32"):
            servable._run_tensors({"x": X})  # type: ignore[attr-defined]
    finally:
        servable.close()


def test_a_pt2_program_converts_to_onnx(tmp_path: Path) -> None:
    module = Lin().eval()
    src = _pt2(module, tmp_path / "lin.pt2")
    res = _add(tmp_path, "olin", src, _opts("y:float32:3", inputs=(), example={"x": X}, to_onnx=True))
    assert res.manifest.format == "onnx"
    assert [(s.name, s.dtype, s.shape) for s in res.manifest.outputs] == [("y", "float32", (3,))]
    with torch.no_grad():
        want = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(np.stack([o["y"] for o in res.outputs]), want, atol=1e-5)


@pytest.mark.parametrize("to_onnx", [False, True])
def test_nested_tuple_outputs_are_flattened_in_order(tmp_path: Path, to_onnx: bool) -> None:
    src = _script(Nested(), tmp_path / "nested.pt")
    res = _add(tmp_path, "nested", src, _opts(example={"x": X}, to_onnx=to_onnx))
    assert [s.name for s in res.manifest.outputs] == ["output0", "output1", "output2"]
    for i, out in enumerate(res.outputs):
        for k, scale in enumerate((1, 2, 3)):
            np.testing.assert_allclose(out[f"output{k}"], X[i] * scale, rtol=1e-6)


def test_a_non_tensor_output_is_refused_cleanly(tmp_path: Path) -> None:
    class WithInt(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            return x, 3

    src = _script(WithInt(), tmp_path / "withint.pt")
    with pytest.raises(ModelError, match=r"output\[1\] is a int, not a tensor"):
        _add(tmp_path, "withint", src, _opts(example={"x": X}))


@pytest.mark.parametrize("to_onnx", [False, True])
def test_dict_outputs_are_named_by_their_keys(tmp_path: Path, to_onnx: bool) -> None:
    src = _script(DictOut(), tmp_path / "dict.pt")
    with pytest.raises(ModelError) as e:
        _add(tmp_path, "dren", src, _opts("a:float32:4", "b:float32:", to_onnx=to_onnx))
    assert "the program returns a dict, so its outputs are named by its keys ['logits', 'norm']" in e.value.message
    res = _add(tmp_path, "dict", src, _opts("norm:float32:", example={"x": X}, to_onnx=to_onnx))
    assert [s.name for s in res.manifest.outputs] == ["logits", "norm"]
    np.testing.assert_allclose(np.stack([o["logits"] for o in res.outputs]), X * 2, rtol=1e-6)
    np.testing.assert_allclose(np.array([o["norm"] for o in res.outputs]), (X * X).sum(-1), rtol=1e-5)


def test_a_dict_missing_a_manifest_key_is_a_model_error(tmp_path: Path) -> None:
    from headrace.models.repository.store import ModelRepository
    from headrace.workers.backends.loader import servable_from_manifest

    src = _script(VarKeys(), tmp_path / "varkeys.pt")
    _add(tmp_path, "varkeys", src, _opts(example={"x": np.abs(X)}), dry_run=False)
    repo = ModelRepository(tmp_path / "repo")
    servable = servable_from_manifest(repo, repo.load_manifest("varkeys"), intra_op_threads=1)
    try:
        bad = X.copy()
        bad[1] = -1000
        with pytest.raises(ModelError, match=r"returned a dict with keys \['other'\]; the manifest's outputs \['y'\]"):
            servable._run_tensors({"x": bad})  # type: ignore[attr-defined]
    finally:
        servable.close()


def test_float16_outputs_stay_float16(tmp_path: Path) -> None:
    src = _script(Half(), tmp_path / "half.pt")
    x = X.astype(np.float16)
    res = _add(tmp_path, "half", src, _opts(example={"x": x}, inputs=()))
    assert [(s.name, s.dtype) for s in res.manifest.outputs] == [("output0", "float16"), ("output1", "float64")]
    assert {o["output0"].dtype for o in res.outputs} == {np.dtype(np.float16)}
    np.testing.assert_array_equal(np.stack([o["output0"] for o in res.outputs]), (x.astype(np.float32) * 2)
                                  .astype(np.float16))
    # Declaring float32 for it is a dtype mismatch like any other.
    with pytest.raises(ModelError, match="--output 'output0' says float32; the program returns float16"):
        _add(tmp_path, "half32", src, _opts("output0:float32:4", example={"x": x}, inputs=()))


@pytest.mark.parametrize("kind", ["torchscript", "pt2"])
def test_an_input_flag_naming_no_input_is_refused(tmp_path: Path, kind: str) -> None:
    from headrace.models.importers.torch import import_torch

    src = _script(Lin(), tmp_path / "m.pt") if kind == "torchscript" else _pt2(Lin(), tmp_path / "m.pt2")
    with pytest.raises(ModelError, match=r"--input \['typo'\]: the program has no such input; its inputs are \['x'\]"):
        import_torch(src, kind, _opts(example={"x": X}, inputs=("typo:float32:7",)), tmp_path / "work")
