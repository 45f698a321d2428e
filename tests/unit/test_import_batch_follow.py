"""Which ONNX outputs follow the batch, read by ``models add`` (``import_onnx``): an output that
leads with a dim of its own (``K``, or unnamed) is only served batched when it truly follows
the batch (not computed through ``NonZero`` and kin, rows equal to each sample run alone);
tensors without a shape in the file; ``--input`` values for names holding ``:``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from headrace.client import errors as E
from headrace.models.importers.common import ImportOptions, parse_io
from headrace.models.importers.onnx import import_onnx
from headrace.models.importers.onnx_deps import value_shaped_ops
from headrace.models.repository.manifest import NO_BATCH, IOSpec

pytestmark = pytest.mark.timeout(60)


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] | None = None) -> Path:
    model = h.make_model(h.make_graph(nodes, path.stem, inputs, outputs, initializer=inits or []),
                         opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _detections(path: Path) -> Path:
    """``dets [K, 2]``: (image, anchor) of every score above 0.5 in the call."""
    return _save(path, [h.make_node("Greater", ["scores", "thr"], ["keep"]), h.make_node("NonZero", ["keep"], ["nz"]),
                        h.make_node("Transpose", ["nz"], ["dets"], perm=[1, 0])],
                 [h.make_tensor_value_info("scores", T.FLOAT, ["N", 3])],
                 [h.make_tensor_value_info("dets", T.INT64, ["K", 2])], [nh.from_array(np.array(0.5, np.float32), "thr")])


def _filter(path: Path) -> Path:
    """``det [K, 5]``: the rows of ``x`` whose last column's sigmoid is above 0.05."""
    return _save(path, [
        h.make_node("Slice", ["x", "s4", "s5", "ax1"], ["score2d"]), h.make_node("Squeeze", ["score2d", "ax1"], ["score"]),
        h.make_node("Sigmoid", ["score"], ["p"]), h.make_node("Greater", ["p", "thr"], ["keep"]),
        h.make_node("NonZero", ["keep"], ["nz"]), h.make_node("Squeeze", ["nz", "ax0"], ["rows"]),
        h.make_node("Gather", ["x", "rows"], ["det"], axis=0)],
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 5])], [h.make_tensor_value_info("det", T.FLOAT, ["K", 5])],
        [nh.from_array(np.array([4], np.int64), "s4"), nh.from_array(np.array([5], np.int64), "s5"),
         nh.from_array(np.array([1], np.int64), "ax1"), nh.from_array(np.array([0], np.int64), "ax0"),
         nh.from_array(np.array(0.05, np.float32), "thr")])


def test_detections_one_per_image_in_the_example_are_not_read_as_the_batch(tmp_path: Path) -> None:
    # one detection per image: K equals the rows at n and at n + 1 (first row again), so
    # counting rows alone read K as the batch and requests got each other's detections
    example = {"scores": np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]], np.float32)}
    imp = import_onnx(_detections(tmp_path / "det.onnx"), ImportOptions(example=example, max_batch=8))
    assert [(s.name, s.shape, s.batch_axis) for s in imp.outputs] == [("dets", (-1, 2), NO_BATCH)]
    assert imp.max_batch == 1
    assert any(n.startswith("output 'dets': its axis 0 does not follow the batch") and "NonZero" in n
               for n in imp.notes)


def test_rows_kept_by_a_filter_are_not_read_as_the_batch_without_an_example(tmp_path: Path) -> None:
    # the random example keeps every row, so det has n rows; the graph says it is a filter
    imp = import_onnx(_filter(tmp_path / "filter.onnx"), ImportOptions(max_batch=8))
    assert [(s.name, s.shape, s.batch_axis) for s in imp.outputs] == [("det", (-1, 5), NO_BATCH)]
    assert imp.max_batch == 1


def test_an_output_whose_rows_are_not_its_samples_alone_is_not_read_as_the_batch(tmp_path: Path) -> None:
    # y [M, 3] is x with its rows reversed: n rows for n samples, but row i is sample n-1-i
    path = _save(tmp_path / "rev.onnx", [h.make_node("Slice", ["x", "st", "en", "ax", "step"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 3])], [h.make_tensor_value_info("y", T.FLOAT, ["M", 3])],
                 [nh.from_array(np.array([-1], np.int64), "st"), nh.from_array(np.array([-2**62], np.int64), "en"),
                  nh.from_array(np.array([0], np.int64), "ax"), nh.from_array(np.array([-1], np.int64), "step")])
    imp = import_onnx(path, ImportOptions(max_batch=8))
    assert [(s.name, s.batch_axis) for s in imp.outputs] == [("y", NO_BATCH)] and imp.max_batch == 1
    assert any("sample 0 run alone gives other values than row 0" in n for n in imp.notes)
    given = parse_io("y:float32:3")  # an --output flag is taken as given
    imp = import_onnx(path, ImportOptions(outputs={"y": given}, max_batch=8))
    assert imp.outputs == (given,) and imp.max_batch == 8


def test_a_row_wise_output_with_a_name_of_its_own_stays_batched(tmp_path: Path) -> None:
    path = _save(tmp_path / "relu.onnx", [h.make_node("Relu", ["x"], ["y"]), h.make_node("Neg", ["x"], ["z"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 3])],
                 [h.make_tensor_value_info("y", T.FLOAT, ["M", 3]), h.make_tensor_value_info("z", T.FLOAT, [None, 3])])
    imp = import_onnx(path, ImportOptions(max_batch=8))
    assert {s.name: (s.shape, s.batch_axis) for s in imp.outputs} == {"y": ((3,), 0), "z": ((3,), 0)}
    assert imp.max_batch == 8 and not imp.notes


def test_value_shaped_ops_count_topk_only_with_a_k_read_from_values() -> None:
    k_of = {"const": [], "shape": [h.make_node("Shape", ["x"], ["sh"]), h.make_node("Gather", ["sh", "one"], ["k"])],
            "values": [h.make_node("ReduceMax", ["kin"], ["k"], keepdims=1)]}
    for how, nodes in k_of.items():
        k = "kc" if how == "const" else "k"
        graph = h.make_graph(nodes + [h.make_node("TopK", ["x", k], ["v", "i"])], "g",
                             [h.make_tensor_value_info("x", T.FLOAT, ["N", 8]),
                              h.make_tensor_value_info("kin", T.INT64, [1])],
                             [h.make_tensor_value_info("v", T.FLOAT, None)],
                             [nh.from_array(np.array([2], np.int64), "kc"), nh.from_array(np.array([1], np.int64), "one")])
        assert value_shaped_ops(graph, ["v"]) == {"v": {"TopK"} if how == "values" else set()}, how


def test_an_output_without_a_shape_in_the_file_takes_the_one_onnxruntime_infers(tmp_path: Path) -> None:
    path = _save(tmp_path / "noshape.onnx", [h.make_node("Mul", ["x", "two"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                 [nh.from_array(np.array(2, np.float32), "two")])
    imp = import_onnx(path, ImportOptions(max_batch=8))
    assert imp.outputs == (IOSpec("y", "float32", (4,), 0),) and imp.max_batch == 8


def test_an_input_without_a_shape_is_refused_with_how_to_give_it_one(tmp_path: Path) -> None:
    path = _save(tmp_path / "norank.onnx", [h.make_node("Mul", ["x", "two"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, None)], [h.make_tensor_value_info("y", T.FLOAT, None)],
                 [nh.from_array(np.array(2, np.float32), "two")])
    with pytest.raises(E.ModelError, match=r"input\(s\) \['x'\] declare no shape \(any rank\).*update_model_dims"):
        import_onnx(path, ImportOptions())


@pytest.mark.parametrize(("text", "spec"), [
    ("x:0:float32:4", IOSpec("x:0", "float32", (4,), 0)),
    ("state:0:float32:2,B,3", IOSpec("state:0", "float32", (2, 3), 1)),
    ("sr:0:int64::nobatch", IOSpec("sr:0", "int64", (), NO_BATCH)),
    ("a:b:c:float16:-1:nobatch", IOSpec("a:b:c", "float16", (-1,), NO_BATCH)),
])
def test_names_holding_colons_parse(text: str, spec: IOSpec) -> None:
    assert parse_io(text) == spec


@pytest.mark.parametrize(("text", "match"), [("x:0:float32", "the shape is missing"),
                                             ("x:float32:3:nobatch:more", "only 'nobatch' may follow")])
def test_colon_names_keep_plain_refusals(text: str, match: str) -> None:
    with pytest.raises(E.ModelError, match=match):
        parse_io(text)


def test_the_flag_add_suggests_for_an_unclear_batch_axis_parses_and_imports(tmp_path: Path) -> None:
    path = _save(tmp_path / "tf.onnx", [h.make_node("Relu", ["x:0"], ["y:0"]), h.make_node("Neg", ["state:0"], ["s:0"])],
                 [h.make_tensor_value_info("x:0", T.FLOAT, [None, 4]),
                  h.make_tensor_value_info("state:0", T.FLOAT, [2, None, 3])],
                 [h.make_tensor_value_info("y:0", T.FLOAT, [None, 4]),
                  h.make_tensor_value_info("s:0", T.FLOAT, [2, None, 3])])
    with pytest.raises(E.ModelError) as refused:
        import_onnx(path, ImportOptions())
    flags = [w for w in str(refused.value).split() if w.startswith("state:0:")]
    assert flags == ["state:0:float32:2,B,3", "state:0:float32:2,-1,3:nobatch"]
    given = parse_io(flags[0])
    imp = import_onnx(path, ImportOptions(inputs={"state:0": given}, outputs={"s:0": parse_io("s:0:float32:2,B,3")}))
    assert {s.name: (s.shape, s.batch_axis) for s in imp.inputs} == {"x:0": ((4,), 0), "state:0": ((2, 3), 1)}
    assert parse_io(flags[1]) == IOSpec("state:0", "float32", (2, -1, 3), NO_BATCH)


def test_a_dynamically_quantized_model_whose_output_dim_has_its_own_name_stays_batched(tmp_path: Path) -> None:
    # tf2onnx names output dims unk__N and torch exports often name them apart from the
    # input's: a guessed batch axis. Dynamic INT8 takes one activation scale over the call,
    # so each row moves a little with its call-mates: not a reason to serve one per call.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w1, w2 = nh.from_array(rng.standard_normal((8, 64)).astype(np.float32), "W1"), \
        nh.from_array(rng.standard_normal((64, 4)).astype(np.float32), "W2")
    fp32 = _save(tmp_path / "mlp.onnx", [h.make_node("MatMul", ["x", "W1"], ["a"]), h.make_node("Relu", ["a"], ["r"]),
                                         h.make_node("MatMul", ["r", "W2"], ["y"])],
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])], [h.make_tensor_value_info("y", T.FLOAT, ["unk__12", 4])],
                 [w1, w2])
    int8 = tmp_path / "mlp_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    example = {"x": (rng.standard_normal((8, 8)) * rng.uniform(0.1, 10.0, (8, 1))).astype(np.float32)}
    for path in (fp32, int8):
        imp = import_onnx(path, ImportOptions(example=example, max_batch=32))
        assert imp.max_batch == 32 and [s.batch_axis for s in imp.outputs] == [0], (path.name, imp.notes)
