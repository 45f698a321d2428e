"""Unit tests of the bring-your-own-model parts: the signature syntax, batch-axis detection,
per-input batching and unbatched models, per-token unpadding, the manifest-vs-model
comparison, KServe-style metadata, and the operator servable base class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.config import ConfigError
from headrace.client.protocol import Envelope, Request
from headrace.client.registry import ModelRecord, WorkerRecord
from headrace.cluster.serve.metadata import model_metadata, models_index
from headrace.models.importers.common import parse_io
from headrace.models.importers.onnx import batch_axes
from headrace.models.repository.manifest import IOSpec, Manifest
from headrace.workers.backends import CustomServable, TensorSpec, prepost, signature
from headrace.workers.backends.custom import import_servable_class
from headrace.workers.settings import WorkerSettings

pytestmark = pytest.mark.timeout(30)


def _req(i: int, **inputs: Any) -> Request:
    return Request(Envelope(f"r{i}", "reply"), inputs={k: np.asarray(v) for k, v in inputs.items()})


def _manifest(inputs: Sequence[IOSpec], outputs: Sequence[IOSpec], **kw: Any) -> Manifest:
    m = Manifest(name="m", version="1", format="onnx", backend="onnxruntime", precision="fp32",
                 inputs=tuple(inputs), outputs=tuple(outputs), **kw)
    m.validate()
    return m


@pytest.mark.parametrize("text,spec", [
    ("x:float32:3,224,224", IOSpec("x", "float32", (3, 224, 224), 0)),
    ("state:float32:2,B,128", IOSpec("state", "float32", (2, 128), 1)),
    ("t:int64:-1", IOSpec("t", "int64", (-1,), 0)),
    ("t:int64:?,4", IOSpec("t", "int64", (-1, 4), 0)),
    ("sr:int64:", IOSpec("sr", "int64", (), 0)),
    ("sr:int64::nobatch", IOSpec("sr", "int64", (), -1)),
])
def test_parse_io(text: str, spec: IOSpec) -> None:
    assert parse_io(text) == spec


@pytest.mark.parametrize("text,match", [("x:float32", "NAME:DTYPE:SHAPE"), ("x:complex64:3", "dtype"),
                                        ("x:float32:B,B", "at most one B"), ("x:float32:0", ">= 1"),
                                        ("x:float32:3:shared", "nobatch"), ("x:float32:a", "not a number")])
def test_parse_io_refuses(text: str, match: str) -> None:
    with pytest.raises(E.ModelError, match=match):
        parse_io(text)


def test_batch_axes_from_a_named_dim_wherever_it_sits() -> None:
    ins = [("input", "float32", ("batch", "seq")), ("state", "float32", (2, "batch", 128)), ("sr", "int64", ())]
    outs = [("output", "float32", ("batch", 1)), ("stateN", "float32", ("d0", "batch", "d2"))]
    assert batch_axes(ins, outs) == ({"input": 0, "state": 1, "sr": -1, "output": 0, "stateN": 1}, [])


@pytest.mark.parametrize(("ins", "outs", "axes"), [
    # time-major (nn.LSTM's default): the dim named batch sits on axis 1 of x, h0, c0
    ([("x", "float32", ("seq", "batch", 5)), ("h0", "float32", (1, "batch", 16))],
     [("logits", "float32", ("batch", 2)), ("h", "float32", (1, "batch", 16))],
     {"x": 1, "h0": 1, "logits": 0, "h": 1}),
    # torch dynamic_axes given as lists: every tensor leads with a name of its own
    ([("a", "float32", ("a_dynamic_axes_1", 4)), ("b", "float32", ("b_dynamic_axes_1", 6))],
     [("y", "float32", ("y_dynamic_axes_1", 3))], {"a": 0, "b": 0, "y": 0}),
    # a shared table of its own length: the output leads with the batched input's name
    ([("x", "float32", ("N", 4)), ("table", "float32", ("K", 3))], [("y", "float32", ("N", 3))],
     {"x": 0, "table": -1, "y": 0}),
    # a sequence dim shared by two inputs (ids [batch, seq]) does not win over batch
    ([("ids", "int64", ("batch_size", "sequence")), ("mask", "int64", ("batch_size", "sequence")),
      ("pos", "int64", ("sequence",))], [("out", "float32", ("batch_size", "sequence", 8))],
     {"ids": 0, "mask": 0, "pos": -1, "out": 0}),
])
def test_batch_axes_name_the_batch_dim_by_its_name_sharing_or_the_outputs(ins: Any, outs: Any, axes: Any) -> None:
    assert batch_axes(ins, outs) == (axes, [])


def test_batch_axes_of_unnamed_dims_asks_when_it_cannot_tell() -> None:
    ins = [("input", "float32", (None, None)), ("state", "float32", (2, None, 128)), ("sr", "int64", ())]
    axes, unclear = batch_axes(ins, [("out", "float32", (None, 1))])
    assert axes["input"] == 0 and axes["sr"] == -1 and unclear == ["state"]
    fixed = [("x", "float32", (1, 3, 8, 8))]
    assert batch_axes(fixed, [("y", "float32", (1, 10))]) == ({"x": -1, "y": -1}, [])


def test_manifest_batch_axis_round_trips_and_is_validated() -> None:
    m = _manifest([IOSpec("s", "float32", (2, 4), 1), IOSpec("sr", "int64", (), -1)], [IOSpec("y", "float32", (1,))])
    again = Manifest.from_dict(m.to_dict())
    assert again.inputs == m.inputs and "batch_axis" not in again.to_dict()["outputs"][0]
    bad = m.to_dict()
    bad["inputs"][0]["batch_axis"] = 3
    with pytest.raises(E.RepositoryError, match="batch_axis"):
        Manifest.from_dict(bad)
    with pytest.raises(E.RepositoryError, match="batch_dim -1"):
        _manifest([IOSpec("sr", "int64", (), -1)], [IOSpec("y", "float32", (1,))])


def test_batching_stacks_on_each_inputs_axis_and_groups_shared_values() -> None:
    ins = (TensorSpec("x", "float32", (3,)), TensorSpec("s", "float32", (2, 4), 1), TensorSpec("sr", "int64", (), -1))
    outs = (TensorSpec("y", "float32", (3,)), TensorSpec("sN", "float32", (2, 4), 1))
    m = _manifest([IOSpec(t.name, t.dtype, t.shape, t.batch_axis) for t in ins],
                  [IOSpec(t.name, t.dtype, t.shape, t.batch_axis) for t in outs])
    reqs = [_req(i, x=np.full(3, i, np.float32), s=np.full((2, 4), i, np.float32), sr=np.int64(8000 if i == 2 else 16000))
            for i in range(4)]
    calls: list[dict[str, Any]] = []

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        calls.append(feed)
        assert feed["s"].shape == (2, len(feed["x"]), 4) and feed["sr"].shape == ()
        return {"y": feed["x"] * 2, "sN": feed["s"] + feed["sr"]}

    out = prepost.run_tensor_batch(reqs, m, ins, run, outs)
    assert sorted(len(c["x"]) for c in calls) == [1, 3]  # sr=8000 runs apart
    for i, o in enumerate(out):
        np.testing.assert_array_equal(o["y"], np.full(3, 2 * i))
        np.testing.assert_array_equal(o["sN"], np.full((2, 4), i + (8000 if i == 2 else 16000)))


def test_unbatched_model_runs_each_request_as_sent() -> None:
    m = _manifest([IOSpec("x", "float32", (1, 4), -1)], [IOSpec("y", "float32", (1, 2), -1)], batch_dim=-1)
    seen: list[tuple[int, ...]] = []

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        seen.append(feed["x"].shape)
        return {"y": feed["x"][:, :2]}

    out = prepost.run_tensor_batch([_req(i, x=np.full((1, 4), i, np.float32)) for i in range(3)], m,
                                   prepost.specs(m.inputs), run, prepost.specs(m.outputs))
    assert seen == [(1, 4)] * 3 and [o["y"].shape for o in out] == [(1, 2)] * 3


def test_split_refuses_an_output_without_the_batch_rows() -> None:
    with pytest.raises(E.ModelError, match="batch axis 1"):
        prepost.split({"s": np.zeros((2, 3, 4))}, 2, "none", (TensorSpec("s", "float32", (2, 4), 1),))


def test_per_token_outputs_are_cut_at_each_texts_length() -> None:
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    res = prepost.split({"h": np.ones((2, 6, 4), np.float32), "e": np.ones((2, 4), np.float32)}, 2, "none")
    prepost.unpad(res, mask, ["h"])
    assert [r["h"].shape for r in res] == [(3, 4), (6, 4)] and res[0]["e"].shape == (4,)


def test_graph_comparison_names_both_sides() -> None:
    m = _manifest([IOSpec("x", "float32", (3, 32, 32))], [IOSpec("y", "float32", (-1,))])
    with pytest.raises(E.ModelError) as e:
        signature.check_graph(m, [("x", "float32", (-1, 3, 64, 64))], [("y", "float32", (-1, 10))], "model.onnx")
    msg = e.value.message
    assert "input 'x': manifest says float32 [B,3,32,32]; model.onnx has float32 [B,3,64,64] (dim 2: 32 vs 64)" in msg
    assert "output 'y': manifest says float32 [B,-1]; model.onnx has float32 [B,10] (dim 1: any (-1) vs 10)" in msg
    with pytest.raises(E.ModelError, match="fixes its batch axis 0 at 8"):
        signature.check_graph(m, [("x", "float32", (8, 3, 32, 32))], [("y", "float32", (8, 10))], "model.onnx")
    with pytest.raises(E.ModelError, match=r"model.onnx inputs \['z'\] are missing from the manifest"):
        signature.check_graph(m, [("x", "float32", (-1, 3, 32, 32)), ("z", "float32", (-1,))],
                              [("y", "float32", (-1, 10))], "model.onnx")


def _record() -> ModelRecord:
    sig = {"model": "vad", "version": "2", "accepts_text": False, "batched": True, "max_batch": 0,
           "platform": "onnxruntime_onnx", "labels": ["a", "b"],
           "inputs": [{"name": "state", "dtype": "float32", "datatype": "FP32", "shape": [2, 128], "batch_axis": 1},
                      {"name": "sr", "dtype": "int64", "datatype": "INT64", "shape": [], "batch_axis": -1}],
           "outputs": [{"name": "p", "dtype": "float32", "datatype": "FP32", "shape": [1], "batch_axis": 0}]}
    workers = {"w1": WorkerRecord("w1", seen_ms=1000, version="2", max_batch=16),
               "w0": WorkerRecord("w0", seen_ms=0, version="1", max_batch=4)}
    return ModelRecord("vad", 1000, workers, {"2": sig})


def test_metadata_is_kserve_style_from_live_workers_only() -> None:
    from headrace.client.health import describe

    meta = model_metadata(describe("vad", _record(), now_ms=30_500))  # w1 live (29.5 s), w0 stale (30.5 s)
    assert meta["versions"] == ["2"] and meta["workers"] == 1 and meta["max_batch_size"] == 16
    assert meta["inputs"][0] == {"name": "state", "datatype": "FP32", "shape": [2, -1, 128], "sample_shape": [2, 128],
                                 "dtype": "float32", "batch_axis": 1}
    assert meta["inputs"][1]["shape"] == [] and meta["inputs"][1]["batch_axis"] == -1
    assert meta["labels"] == ["a", "b"] and meta["platform"] == "onnxruntime_onnx"
    assert models_index({"vad": _record()}, 10**9) == [{"name": "vad", "versions": [], "ready": False, "workers": 0}]
    with pytest.raises(E.UnknownModel, match="no worker has ever registered model 'vda'"):
        describe("vda", None, 0)
    with pytest.raises(E.ModelNotFoundError, match="no registered signature for version '7'"):
        model_metadata(describe("vad", _record(), now_ms=30_500), version="7")


class _Doubler(CustomServable):
    inputs = (TensorSpec("x", "float32", (-1,)),)
    outputs = (TensorSpec("y", "float32", (-1,)),)
    max_batch = 2

    def load(self) -> None:
        self.calls: list[int] = []

    def infer_batch(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        self.calls.append(len(batch))
        if any(float(s["x"].sum()) < 0 for s in batch):
            raise ValueError("negative input")
        return [{"y": s["x"] * 2} for s in batch]


def test_custom_servable_batches_checks_and_wraps_failures() -> None:
    s = _Doubler("dbl")
    s.load()
    out = s.infer([_req(i, x=np.full(3, i, np.float32)) for i in range(5)])
    assert s.calls == [2, 2, 1] and [float(o["y"][0]) for o in out] == [0, 2, 4, 6, 8]
    with pytest.raises(E.ModelError, match="negative input"):
        s.infer([_req(0, x=np.full(3, -1, np.float32))])
    with pytest.raises(E.InvalidTensorError):
        s.check(_req(0, x=np.zeros(3, np.int64)))
    assert s.describe()["servable"].endswith(":_Doubler") and s.describe()["platform"] == "python"


def test_servable_references_are_checked() -> None:
    assert import_servable_class(f"{__name__}:_Doubler") is _Doubler
    with pytest.raises(ConfigError, match="package.module:Class"):
        import_servable_class("no_colon")
    with pytest.raises(ConfigError, match="cannot import"):
        import_servable_class("no_such_module_xyz:Thing")
    with pytest.raises(ConfigError, match="not a subclass"):
        import_servable_class("numpy:ndarray")
    with pytest.raises(ConfigError, match="servable"):
        WorkerSettings(servable="bad ref:")


def test_a_bare_model_folder_says_a_manifest_is_needed(tmp_path: Any) -> None:
    from headrace.models.repository.store import ModelRepository

    (tmp_path / "resnet18" / "1").mkdir(parents=True)
    (tmp_path / "resnet18" / "1" / "model.onnx").write_bytes(b"x")
    with pytest.raises(E.ModelNotFoundError, match=r"\['resnet18/1'\] hold no manifest.json: add a model with "
                                                   r"`headrace models add resnet18 FILE`"):
        ModelRepository(tmp_path).latest("resnet18")


def test_ray_app_args_carry_an_operator_servable_to_the_replica_loader(tmp_path: Any) -> None:
    from headrace.cluster.serve.app import ModelAppArgs
    from headrace.workers.backends import load_servable

    args = ModelAppArgs.from_dict({"model": "dbl", "model_repo": str(tmp_path / "none"),
                                   "worker_overrides": {"servable": f"{__name__}:_Doubler"}})
    settings = args.worker_settings()
    assert settings.servable == f"{__name__}:_Doubler"
    servable = load_servable(settings)  # the replica's loading path; no repository entry needed
    assert isinstance(servable, _Doubler) and servable.calls == []
    with pytest.raises(E.ModelNotFoundError, match="version 3"):
        load_servable(WorkerSettings(model="dbl", version="3", servable=settings.servable, model_repo=str(tmp_path)))


def test_deploy_check_loads_the_version_and_refuses_a_missing_one(tmp_path: Any) -> None:
    import onnx
    from onnx import TensorProto, helper

    from headrace.cluster.ops.versions import check_version
    from headrace.models.repository.store import ModelRepository

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "relu.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    repo = ModelRepository(tmp_path / "repo")
    repo.add("relu", {"model.onnx": path}, format="onnx", inputs=[IOSpec("x", "float32", (3,))],
             outputs=[IOSpec("y", "float32", (3,))])
    app = {"name": "relu", "import_path": "headrace.cluster.serve.app:build_app",
           "args": {"model": "relu", "model_repo": str(repo.root)}}
    cfg = {"applications": [app]}
    assert check_version(cfg, "relu", "1") == "relu/1 (onnx)"
    with pytest.raises(E.ModelNotFoundError, match=r"no version '2'.*versions: \['1'\]"):
        check_version(cfg, "relu", "2")
    wrong = {"applications": [{**app, "args": {"model": "relu", "model_repo": str(tmp_path / "elsewhere")}}]}
    with pytest.raises(ConfigError, match="--no-check"):
        check_version(wrong, "relu", "1")
    fake = {"applications": [{**app, "args": {"model": "relu", "fake": "affine"}}]}
    assert "fake affine" in check_version(fake, "relu", "7")
