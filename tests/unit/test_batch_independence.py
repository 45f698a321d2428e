"""Batch independence: a request's answer must not depend on the other requests of its model
call. An output without a batch axis made from batched inputs (a sum over the batch) is a value
of the whole call; the importers read that from the ONNX graph (a torch program is taken to
mix) and serve such a model one request per call, while outputs of shared inputs only still
go whole to every request. A model mixing rows behind a batch axis (a softmax over the batch)
is caught by ``models add`` running its example alone and together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from headrace.models.importers.common import ImportOptions, parse_io
from headrace.models.importers.onnx import import_onnx
from headrace.models.importers.onnx_deps import inputs_feeding
from headrace.models.repository.manifest import NO_BATCH


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], opset: int = 17,
          inits: list[Any] | None = None) -> Path:
    graph = h.make_graph(nodes, path.stem, inputs, outputs, initializer=inits or [])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _branch(name: str, op: str, src: str) -> Any:
    return h.make_graph([h.make_node(op, [src], [f"{name}_out"])], name, [],
                        [h.make_tensor_value_info(f"{name}_out", T.FLOAT, None)])


def test_inputs_feeding_follows_nodes_and_the_outer_names_subgraphs_read() -> None:
    cond = h.make_node("If", ["flag"], ["picked"], then_branch=_branch("then", "Neg", "x"),
                       else_branch=_branch("else", "Relu", "k"))
    graph = h.make_graph(
        [h.make_node("ReduceSum", ["x"], ["total"], keepdims=0), h.make_node("Mul", ["k", "k"], ["k2"]), cond],
        "g", [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("x", "k")]
        + [h.make_tensor_value_info("flag", T.BOOL, [])],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("total", "k2", "picked")])
    assert inputs_feeding(graph, ["total", "k2", "picked", "x"]) == {
        "total": {"x"}, "k2": {"k"}, "picked": {"flag", "x", "k"}, "x": {"x"}}


def test_an_onnx_output_summed_over_the_batch_is_served_one_request_per_call(tmp_path: Path) -> None:
    path = _save(tmp_path / "sum.onnx", [h.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])], [h.make_tensor_value_info("s", T.FLOAT, [])],
                 opset=11)
    imp = import_onnx(path, ImportOptions(max_batch=64))
    assert imp.batch_dim == 0 and imp.max_batch == 1
    assert [(s.name, s.shape, s.batch_axis) for s in imp.outputs] == [("s", (), NO_BATCH)]
    assert any("'s' has no batch axis but is computed from the batched input(s) ['x']" in n for n in imp.notes)


def test_an_onnx_output_of_shared_inputs_only_keeps_the_model_batched(tmp_path: Path) -> None:
    # 'scale' has no batch axis (one value per call); 'twice' is made from it alone, so it is
    # the same for every request of a call and goes whole to each.
    path = _save(tmp_path / "shared.onnx",
                 [h.make_node("Mul", ["x", "scale"], ["y"]), h.make_node("Add", ["scale", "scale"], ["twice"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4]), h.make_tensor_value_info("scale", T.FLOAT, [1])],
                 [h.make_tensor_value_info("y", T.FLOAT, ["N", 4]), h.make_tensor_value_info("twice", T.FLOAT, [1])])
    imp = import_onnx(path, ImportOptions(max_batch=64))
    assert imp.batch_dim == 0 and imp.max_batch == 64
    assert {s.name: s.batch_axis for s in imp.outputs} == {"y": 0, "twice": NO_BATCH}
    assert not any("no batch axis but" in n for n in imp.notes)


def _nonzero(path: Path, out_dims: list[Any]) -> Path:
    return _save(path, [h.make_node("Greater", ["x", "zero"], ["g"]), h.make_node("NonZero", ["g"], ["idx"]),
                        h.make_node("Transpose", ["idx"], ["where"]), h.make_node("Relu", ["x"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                 [h.make_tensor_value_info("where", T.INT64, out_dims),
                  h.make_tensor_value_info("y", T.FLOAT, [None, 4])],
                 inits=[onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")])


@pytest.mark.parametrize("out_dims", [["K", 2], [None, 2]])
def test_an_onnx_output_whose_leading_dim_does_not_follow_the_batch_goes_whole_to_one_request(
        tmp_path: Path, out_dims: list[Any]) -> None:
    # NonZero counts the positive values of the whole call: named 'K' or left unnamed, the
    # graph alone would take its axis 0 for the batch; 'y' (unnamed too) does follow it.
    imp = import_onnx(_nonzero(tmp_path / "nz.onnx", out_dims), ImportOptions(max_batch=64))
    assert {s.name: (s.shape, s.batch_axis) for s in imp.outputs} == {"where": ((-1, 2), NO_BATCH), "y": ((4,), 0)}
    assert imp.max_batch == 1
    assert any(n.startswith("output 'where': its axis 0 does not follow the batch") for n in imp.notes)
    assert not any("'y'" in n for n in imp.notes)


def test_the_batch_probe_uses_the_given_example_and_keeps_outputs_given_by_flag(tmp_path: Path) -> None:
    path = _nonzero(tmp_path / "nz.onnx", ["K", 2])
    # every value positive: 4 indices per row, so K = 4n never equals n
    imp = import_onnx(path, ImportOptions(max_batch=8, example={"x": np.ones((3, 4), np.float32)}))
    assert next(s for s in imp.outputs if s.name == "where").batch_axis == NO_BATCH
    assert any("(3 requests gave 12, 4 requests gave 16)" in n for n in imp.notes)
    given = parse_io("where:int64:-1,2")
    imp = import_onnx(path, ImportOptions(outputs={"where": given}, max_batch=8))
    assert next(s for s in imp.outputs if s.name == "where") == given and imp.max_batch == 8


def test_an_input_leading_with_its_own_dim_name_is_batched_when_the_model_only_runs_that_way(tmp_path: Path) -> None:
    # A [N, 4] + B [M, 4] -> Y [N, 4]: the names say B is shared, but Add only runs with M == N
    path = _save(tmp_path / "add.onnx", [h.make_node("Add", ["A", "B"], ["Y"])],
                 [h.make_tensor_value_info("A", T.FLOAT, ["N", 4]), h.make_tensor_value_info("B", T.FLOAT, ["M", 4])],
                 [h.make_tensor_value_info("Y", T.FLOAT, ["N", 4])])
    for example in (None, {"A": np.ones((3, 4), np.float32), "B": np.ones((3, 4), np.float32)}):
        imp = import_onnx(path, ImportOptions(example=example))
        assert {s.name: s.batch_axis for s in (*imp.inputs, *imp.outputs)} == {"A": 0, "B": 0, "Y": 0}
        assert any("['B'] lead with a dim named apart from the batch" in n for n in imp.notes)
    # a table of its own length that the model reduces runs as a shared input: it stays one
    path = _save(tmp_path / "table.onnx",
                 [h.make_node("ReduceSum", ["table", "zero"], ["row"], keepdims=0), h.make_node("Add", ["x", "row"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 3]), h.make_tensor_value_info("table", T.FLOAT, ["K", 3])],
                 [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])],
                 inits=[onnx.numpy_helper.from_array(np.zeros(1, np.int64), "zero")])
    imp = import_onnx(path, ImportOptions())
    assert {s.name: s.batch_axis for s in (*imp.inputs, *imp.outputs)} == {"x": 0, "table": NO_BATCH, "y": 0}
    assert not any("named apart" in n for n in imp.notes)


def test_a_model_failing_on_the_probe_is_left_as_the_graph_says(tmp_path: Path) -> None:
    # ids + 5 always miss the one-row table, so the run fails; the import keeps the graph's
    # reading (the check after it reports the failure) instead of judging 'where'.
    path = _save(tmp_path / "gather.onnx",
                 [h.make_node("Add", ["ids", "five"], ["far"]), h.make_node("Gather", ["table", "far"], ["out"]),
                  h.make_node("NonZero", ["out"], ["idx"]), h.make_node("Transpose", ["idx"], ["where"])],
                 [h.make_tensor_value_info("ids", T.INT64, ["N"])],
                 [h.make_tensor_value_info("where", T.INT64, [None, 2])],
                 inits=[onnx.numpy_helper.from_array(np.ones((1, 3), np.float32), "table"),
                        onnx.numpy_helper.from_array(np.array(5, np.int64), "five")])
    imp = import_onnx(path, ImportOptions(max_batch=8))
    assert [(s.name, s.batch_axis) for s in imp.outputs] == [("where", 0)] and imp.max_batch == 8


@pytest.mark.parametrize(("body", "axes", "max_batch"), [
    ("return x.sum()", {"output0": NO_BATCH}, 1),
    ("return x.mean(0)", {"output0": NO_BATCH}, 1),
    ("return x.t()", {"output0": 1}, 0),
    ("return {'y': x * 2, 'total': x.sum()}", {"y": 0, "total": NO_BATCH}, 1),
    ("return x * 2", {"output0": 0}, 0),
    # a program refusing one more row is judged by the example's own batch size
    ("if x.shape[0] > 2:\n            raise RuntimeError('at most 2')\n        return x * 2", {"output0": 0}, 0),
])
def test_torch_outputs_get_the_axis_that_follows_the_batch(tmp_path: Path, body: str, axes: dict[str, int],
                                                           max_batch: int) -> None:
    torch = pytest.importorskip("torch", reason="the torch importer needs torch")
    from headrace.models.importers.common import parse_io
    from headrace.models.importers.torch import import_torch

    src = tmp_path / "prog.py"
    src.write_text("import torch\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n        " + body + "\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("prog_under_test", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "prog.pt"
    torch.jit.script(mod.M()).save(str(path))
    x_spec = parse_io("x:float32:B,4")
    imp = import_torch(path, "torchscript", ImportOptions(inputs={"x": x_spec}), tmp_path / "work")
    assert {s.name: s.batch_axis for s in imp.outputs} == axes
    assert imp.max_batch == max_batch
    assert imp.example is not None and np.asarray(imp.example["x"]).shape == (2, 4)


def _x(n: int = 8) -> list[Any]:
    return [h.make_tensor_value_info("x", T.FLOAT, ["N", n])]


def _y(n: int = 8) -> list[Any]:
    return [h.make_tensor_value_info("y", T.FLOAT, ["N", n])]


@pytest.mark.parametrize(("nodes", "opset"), [
    ([h.make_node("Softmax", ["x"], ["y"], axis=0)], 17),
    ([h.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), h.make_node("Sub", ["x", "m"], ["y"])], 13),
])
def test_models_add_serves_a_model_mixing_the_rows_of_a_call_one_request_per_call(tmp_path: Path, nodes: list[Any],
                                                                                 opset: int) -> None:
    # Both keep the batch axis on their output, so the graph check cannot see it: the
    # example run alone and together can.
    from headrace.cluster.ops.add_model import add_model

    path = _save(tmp_path / "mix.onnx", nodes, _x(), _y(), opset=opset)
    res = add_model(tmp_path / "repo", "mix", path, ImportOptions())
    assert res.manifest.max_batch == 1 and res.published
    assert any("['y'] of a request change with the other requests" in n for n in res.notes)


def test_models_add_says_when_the_example_cannot_show_call_mates_and_leaves_out_arrays_the_model_lacks(
        tmp_path: Path) -> None:
    from headrace.cluster.ops.add_model import add_model

    path = _save(tmp_path / "mix.onnx", [h.make_node("Softmax", ["x"], ["y"], axis=0)], _x(), _y())
    same = np.ones((3, 8), np.float32)  # alike rows: mixing or not, alone equals together
    res = add_model(tmp_path / "repo", "mix", path, ImportOptions(example={"x": same, "labels": np.arange(3)}),
                    dry_run=True)
    assert any("requests are all alike (or just one)" in n and "was not checked" in n for n in res.notes)
    assert any(n.startswith("example array(s) ['labels'] are not inputs of the model") for n in res.notes)
    res = add_model(tmp_path / "repo", "mix", path, ImportOptions(example={"x": same[:1], "labels": np.arange(1)}))
    assert any("was not checked" in n for n in res.notes)
    stored = np.load(tmp_path / "repo" / "mix" / res.manifest.version / "example.npz")
    assert stored.files == ["x"]


def test_models_add_keeps_batching_a_row_wise_model_also_when_dynamically_quantized(tmp_path: Path) -> None:
    # Dynamic INT8 quantisation scales activations over the whole call: small differences
    # between a row alone and in a call, which must not be taken for mixing.
    from onnx import numpy_helper as nh
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from headrace.cluster.ops.add_model import add_model

    rng = np.random.default_rng(0)
    w1 = nh.from_array(rng.standard_normal((8, 64)).astype(np.float32), "W1")
    w2 = nh.from_array(rng.standard_normal((64, 8)).astype(np.float32), "W2")
    graph = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["a"]), h.make_node("Relu", ["a"], ["r"]),
                          h.make_node("MatMul", ["r", "W2"], ["y"])], "mlp", _x(), _y(), initializer=[w1, w2])
    fp32 = tmp_path / "mlp.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(fp32))
    int8 = tmp_path / "mlp_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    example = {"x": (rng.standard_normal((16, 8)) * rng.uniform(0.1, 10.0, (16, 1))).astype(np.float32)}
    for name, path in (("mlp", fp32), ("mlp8", int8)):
        res = add_model(tmp_path / "repo", name, path, ImportOptions(example=example, max_batch=32))
        assert res.manifest.max_batch == 32, res.notes
        assert not any("change with the other requests" in n for n in res.notes)


def test_call_mates_check_needs_distinct_requests_and_judges_float_outputs_only() -> None:
    from headrace.client.protocol import Envelope, Request
    from headrace.workers.backends.call_mates import MAX_ALONE, outputs_moved_by_call_mates

    class Mixing:
        def infer(self, requests: Any) -> list[dict[str, Any]]:
            xs = np.stack([r.inputs["x"] for r in requests])
            return [{"y": x - xs.mean(0), "label": np.int64(np.argmax(x - xs.mean(0)))} for x in xs]

    def reqs(*rows: list[float]) -> list[Request]:
        return [Request(Envelope(f"r{i}", "t"), inputs={"x": np.asarray(r, np.float32)}) for i, r in enumerate(rows)]

    mixing: Any = Mixing()
    distinct = reqs([1.0, 2.0], [5.0, -3.0])
    assert outputs_moved_by_call_mates(mixing, distinct, mixing.infer(distinct)) == ["y"]
    same = reqs([1.0, 2.0], [1.0, 2.0])
    assert outputs_moved_by_call_mates(mixing, same, mixing.infer(same)) == []
    assert outputs_moved_by_call_mates(mixing, distinct[:1], mixing.infer(distinct[:1])) == []

    class Counting(Mixing):
        calls: list[int] = []

        def infer(self, requests: Any) -> list[dict[str, Any]]:
            self.calls.append(len(requests))
            return super().infer(requests)

    counting: Any = Counting()
    many = reqs(*[[float(i), -2.0 * i] for i in range(40)])
    assert outputs_moved_by_call_mates(counting, many, counting.infer(many)) == ["y"]
    assert counting.calls == [40] + [1] * MAX_ALONE  # a long example: only its first requests run alone


def test_models_add_serves_a_model_padding_to_the_longest_request_of_a_call_one_request_per_call(
        tmp_path: Path) -> None:
    # Each request's own values are kept, but its output is cut to the longest request of the
    # call (int64 tokens, so no float tolerance can explain the difference): run alone, a
    # short request gets a shorter answer, so its shape depends on its call-mates.
    from headrace.cluster.ops.add_model import add_model

    zero = onnx.numpy_helper.from_array(np.array(0, np.int64), "zero")
    ax = onnx.numpy_helper.from_array(np.array([1], np.int64), "ax")
    start = onnx.numpy_helper.from_array(np.array([0], np.int64), "start")
    nodes = [h.make_node("Equal", ["t", "zero"], ["pad"]), h.make_node("Not", ["pad"], ["real"]),
             h.make_node("Cast", ["real"], ["n"], to=T.INT64),
             h.make_node("ReduceSum", ["n", "ax"], ["lens"], keepdims=0),
             h.make_node("ReduceMax", ["lens"], ["longest"], keepdims=1),
             h.make_node("Slice", ["t", "start", "longest", "ax"], ["y"])]
    path = _save(tmp_path / "trim.onnx", nodes, [h.make_tensor_value_info("t", T.INT64, ["N", 6])],
                 [h.make_tensor_value_info("y", T.INT64, ["N", "L"])], opset=17, inits=[zero, ax, start])
    tokens = np.array([[5, 6, 0, 0, 0, 0], [7, 8, 9, 1, 2, 0], [3, 0, 0, 0, 0, 0]], np.int64)
    res = add_model(tmp_path / "repo", "trim", path, ImportOptions(example={"t": tokens}, max_batch=16))
    assert res.manifest.max_batch == 1 and res.published, res.notes
    assert any("['y'] of a request change with the other requests" in n for n in res.notes)
