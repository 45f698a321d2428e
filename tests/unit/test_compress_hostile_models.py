"""``headrace compress NAME`` on models that broke it: a converted file that crashes ONNX
Runtime when loaded, outputs whose length follows the batch, sklearn pipelines (ai.onnx.ml
ops next to float ops), data of the wrong dtype, tree ensembles sent to onnx2tf, and a gate
score that rounds up to its floor. Every model is built here, tiny."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from headrace.client.errors import ConfigError, ModelError
from headrace.models.compress import data as D
from headrace.models.compress.anymodel import AnyModelOptions, Evaluated, gate, run_any
from headrace.models.compress.evaluate import Comparison
from headrace.models.compress.steps import Candidate, QuantizeOptions
from headrace.models.repository.manifest import IOSpec
from headrace.models.repository.store import ModelRepository
from tests.support.compress import add_tiny_mlp, mlp_data


def _opts(tmp: Path, name: str, cal: Path, held: Path, steps: tuple[str, ...], **kw: Any) -> AnyModelOptions:
    return AnyModelOptions(name=name, data=cal, held_out=held, steps=steps, repo=tmp / "repo", work_dir=tmp / "work",
                           bench=False, progress=False, threads=1, quantize=QuantizeOptions(mixed=False), **kw)


# --- 1. a candidate that crashes onnxruntime at load --------------------------------------------

_TX = """
import torch, torch.nn as nn
torch.backends.mha.set_fastpath_enabled(False)
torch.manual_seed(0)
class Tx(nn.Module):
    def __init__(s):
        super().__init__()
        s.t = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    def forward(s, x):
        return s.t(x)
torch.onnx.export(Tx().eval(), (torch.randn(2, 5, 16),), sys.argv[1], input_names=["x"], output_names=["y"],
                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
"""


def _python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys\n" + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def crashing_fp16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a torch TransformerEncoderLayer graph, its ORT fp16 conversion), the second one
    crashing ``ort.InferenceSession`` (signal 11 in the extended graph optimiser)."""
    from headrace.models.compress.quantize import convert_fp16

    folder = tmp_path_factory.mktemp("tx")
    src = folder / "tx.onnx"
    made = _python(_TX, str(src))  # torch in a child: its export state stays out of this process
    assert made.returncode == 0, made.stderr[-2000:]
    fp16 = convert_fp16(src, folder / "tx-fp16.onnx")
    probe = _python("import onnxruntime as ort; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])",
                    str(fp16))
    if probe.returncode >= 0:
        pytest.skip(f"this onnxruntime loads the fp16 TransformerEncoderLayer graph (exit {probe.returncode})")
    return src, fp16


def test_vet_names_the_signal_of_a_crashing_load(crashing_fp16: tuple[Path, Path], tmp_path: Path) -> None:
    from headrace.models.compress.candidates import vet, write_sample

    src, fp16 = crashing_fp16
    sample = write_sample({"x": np.zeros((2, 5, 16), np.float32)}, tmp_path / "s.npz")
    with pytest.raises(ModelError, match=r"onnxruntime crashed loading it \(signal 11"):
        vet(fp16, "onnx", sample, ["x"], ["y"])
    vet(src, "onnx", sample, ["x"], ["y"])  # the fp32 graph loads and runs


def test_fp16_crash_is_refused_and_the_other_steps_publish(crashing_fp16: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = crashing_fp16
    repo = ModelRepository(tmp_path / "repo")
    repo.add("tx", {"model.onnx": src}, format="onnx", inputs=[IOSpec("x", "float32", (5, 16))],
             outputs=[IOSpec("y", "float32", (5, 16))])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.normal(size=(16, 5, 16)).astype(np.float32))
    np.savez(tmp_path / "held.npz", x=rng.normal(size=(8, 5, 16)).astype(np.float32))
    opts = _opts(tmp_path, "tx", tmp_path / "cal.npz", tmp_path / "held.npz", ("quantize-dynamic", "fp16"),
                 min_fidelity=0.5)
    # In a child: on code that loads the candidate in-process the whole run dies by SIGSEGV,
    # which must fail this test, not the test runner.
    code = """
        import json
        from pathlib import Path
        from headrace.models.compress.anymodel import AnyModelOptions, run_any
        from headrace.models.compress.steps import QuantizeOptions
        a = json.loads(sys.argv[1])
        res = run_any(AnyModelOptions(name="tx", data=Path(a["cal"]), held_out=Path(a["held"]),
                      steps=("quantize-dynamic", "fp16"), repo=Path(a["repo"]), work_dir=Path(a["work"]),
                      bench=False, progress=False, threads=1, quantize=QuantizeOptions(mixed=False),
                      min_fidelity=0.5))
        print(json.dumps({"published": res.published, "refused": res.refused}))
    """
    args = {"cal": str(opts.data), "held": str(opts.held_out), "repo": str(opts.repo), "work": str(opts.work_dir)}
    proc = _python(code, json.dumps(args))
    assert proc.returncode == 0, f"compress run died (exit {proc.returncode}): {proc.stderr[-1500:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["published"] == ["tx-int8/1"]
    assert "onnxruntime crashed loading it (signal 11" in res["refused"]["fp16"]
    assert [m.name for m in repo.list()] == ["tx", "tx-int8"]
    assert list((opts.work_dir / "reports").glob("tx-v1-*/report.json"))


# --- 3. an output whose length follows the batch ------------------------------------------------


def _trim_model(path: Path) -> None:
    """tokens [B, 12] -> [B, L, 4], L = the longest non-zero run in the call (padding trimmed)."""
    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    table = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Greater", ["tokens", "zero"], ["nz"]),
        helper.make_node("Cast", ["nz"], ["nzi"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["nzi", "one"], ["lens"], keepdims=0),
        helper.make_node("ReduceMax", ["lens"], ["L"], keepdims=1),
        helper.make_node("Slice", ["tokens", "zero1", "L", "one"], ["cut"]),
        helper.make_node("Gather", ["table", "cut"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["out"]),
    ]
    inits = [helper.make_tensor("one", TensorProto.INT64, [1], [1]), helper.make_tensor("zero1", TensorProto.INT64,
                                                                                     [1], [0]),
             onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(w, "w")]
    for i, n in enumerate(nodes):
        n.name = f"{n.op_type}_{i}"
    g = helper.make_graph(nodes, "trim", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", 12])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "L", 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _tokens(rng: np.random.Generator, n: int, longest: int) -> np.ndarray:
    t = rng.integers(1, 50, (n, 12)).astype(np.int64)
    for i, length in enumerate(rng.integers(2, longest + 1, n)):
        t[i, length:] = 0
    return t


def test_ragged_output_is_compared_per_sample_not_a_traceback(tmp_path: Path) -> None:
    _trim_model(tmp_path / "trim.onnx")
    repo = ModelRepository(tmp_path / "repo")
    repo.add("trim", {"model.onnx": tmp_path / "trim.onnx"}, format="onnx",
             inputs=[IOSpec("tokens", "int64", (12,))], outputs=[IOSpec("out", "float32", (-1, 4))])
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "cal.npz", tokens=_tokens(rng, 40, 11))
    # the first held-out call (32 rows) is at most 5 long, the second up to 11
    np.savez(tmp_path / "held.npz", tokens=np.concatenate([_tokens(rng, 32, 5), _tokens(rng, 8, 11)]))
    res = run_any(_opts(tmp_path, "trim", tmp_path / "cal.npz", tmp_path / "held.npz", ("quantize-dynamic",),
                        min_fidelity=0.5, publish="none"))
    int8 = next(e for e in res.evaluated if e.candidate.label == "int8 dynamic")
    assert int8.comparison is not None and int8.accepted, int8.reason


def test_stack_calls_pads_ragged_calls_and_names_a_rank_change() -> None:
    from headrace.models.compress.evaluate import stack_calls

    a, b = np.ones((2, 3, 4)), np.full((1, 5, 4), 2.0)
    out = stack_calls("emb", [a, b])
    assert out.shape == (3, 5, 4) and out[:2, 3:].sum() == 0 and out[2].sum() == 40
    with pytest.raises(ModelError, match="output 'emb'"):
        stack_calls("emb", [a, np.ones((1, 4))])


# --- 4 and 5. an sklearn Pipeline: ai.onnx.ml ops next to float ops ----------------------------


@pytest.fixture(scope="module")
def pipeline_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(120, 8, n_informative=5, n_classes=3, random_state=0)
    x = x.astype(np.float32)
    lr = LogisticRegression(max_iter=300)
    pipe = Pipeline([("s", StandardScaler()), ("p", PCA(4)), ("lr", lr)]).fit(x, y)
    onx = to_onnx(pipe, initial_types=[("input", FloatTensorType([None, 8]))], options={id(lr): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    path = tmp_path_factory.mktemp("pipe") / "pipe.onnx"
    path.write_bytes(onx.SerializeToString())
    return path, x


def test_sklearn_pipeline_quantizes_its_pca_matmul(pipeline_onnx: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import onnxruntime as ort

    from headrace.models.compress.graph import graph_op_types
    from headrace.models.compress.quantize import quantize_dynamic_int8

    src, x = pipeline_onnx
    dst = quantize_dynamic_int8(src, tmp_path / "q.onnx", op_types=["MatMul"])
    assert graph_op_types(dst).get("MatMulInteger")
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (ref == got).mean() >= 0.95


def test_sklearn_pipeline_compress_int8_publishes_and_fp16_is_not_blamed_on_the_host(
        pipeline_onnx: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    from headrace.models.compress.quantize import convert_fp16

    src, x = pipeline_onnx
    fp16 = convert_fp16(src, tmp_path / "f.onnx")
    onnx.checker.check_model(str(fp16), full_check=True)  # nodes next to ai.onnx.ml ops stay fp32
    repo = ModelRepository(tmp_path / "repo")
    repo.add("pipe", {"model.onnx": src}, format="onnx", inputs=[IOSpec("input", "float32", (8,))],
             outputs=[IOSpec("label", "int64", ()), IOSpec("probabilities", "float32", (3,))])
    np.savez(tmp_path / "cal.npz", input=x[:80])
    np.savez(tmp_path / "held.npz", input=x[80:])
    res = run_any(_opts(tmp_path, "pipe", tmp_path / "cal.npz", tmp_path / "held.npz", ("quantize-dynamic", "fp16"),
                        min_fidelity=0.9))
    assert res.published == ["pipe-int8/1"], (res.refused, res.details["failed"])
    why = res.refused.get("fp16", "") + res.details["failed"].get("fp16", "")
    assert "cannot run here" not in why and why  # fp16 is not offered, and not for want of a GPU


def test_an_invalid_converted_graph_is_called_invalid(tmp_path: Path) -> None:
    from headrace.models.compress.steps import _check_graph

    # Sub bound to float and float16 at once: what ORT's fp16 converter made of a sklearn pipeline
    g = helper.make_graph([helper.make_node("Sub", ["a", "b"], ["c"])], "bad",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT16, [1, 2])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="fp16 conversion produced an invalid graph"):
        _check_graph(tmp_path / "bad.onnx", "fp16 conversion")


# --- 6. data of another dtype than the graph's input -------------------------------------------


@pytest.mark.parametrize("arr,want", [
    (np.zeros((6, 16), np.float64), "float32"), (np.zeros((6, 16), np.float16), "float32"),
    (np.zeros((6, 16), bool), "float32"), (np.full((6, 16), "a"), "float32"), (np.zeros((6, 16), np.int32), "int64"),
])
def test_wrong_dtype_names_file_input_and_both_dtypes(tmp_path: Path, arr: np.ndarray, want: str) -> None:
    np.savez(tmp_path / "d.npz", x=arr)
    with pytest.raises(ConfigError, match=rf"d\.npz: input 'x' is {arr.dtype.name}, the model takes {want}"):
        D.load_npz(tmp_path / "d.npz", {"x": [None, 16]}, {"x": np.dtype(want)})


def test_compress_refuses_float64_data_before_running_anything(tmp_path: Path) -> None:
    add_tiny_mlp(ModelRepository(tmp_path / "repo"), tmp_path)
    cal, held = mlp_data(tmp_path / "data", n=20)
    np.savez(tmp_path / "f64.npz", x=np.load(cal)["x"].astype(np.float64))
    with pytest.raises(ConfigError, match="f64.npz: input 'x' is float64, the model takes float32"):
        run_any(_opts(tmp_path, "tiny", tmp_path / "f64.npz", held, ("quantize-dynamic",)))


# --- 7. onnx2tf on ai.onnx.ml ops; a gate score that rounds to its floor -------------------------


def test_tflite_refuses_ai_onnx_ml_ops_in_one_line(tmp_path: Path) -> None:
    from headrace.models.compress.edge import export_tflite

    node = helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.0, 0.0], scale=[1.0, 2.0])
    g = helper.make_graph([node], "ml", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    path = tmp_path / "ml.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]),
              str(path))
    with pytest.raises(ModelError) as got:
        export_tflite(path, [{"x": np.zeros((1, 2), np.float32)}], tmp_path / "out")
    assert "onnx2tf has no converter for Scaler (ai.onnx.ml)" in got.value.message
    assert "Traceback" not in got.value.message and "\n" not in got.value.message


def test_gate_prints_a_score_just_under_the_floor_as_under_it(tmp_path: Path) -> None:
    cmp = Comparison(0.989996, "y", {"y": "other"}, {"y": {"score": 0.989996}})
    e = Evaluated(Candidate("int8 static", tmp_path / "m.onnx", "onnx", "int8", [{"step": "quantize-static"}]), cmp)
    gate([e], 0.99)
    assert not e.accepted and "score 0.989996 (other) is below --min-fidelity 0.99" in e.reason


def test_a_regressor_inside_zero_one_is_held_to_its_error_not_to_agreement_at_a_half() -> None:
    # Outputs of 0.479-0.504: agreement at 0.5 let an INT8 copy with errors of several times
    # the output's spread pass with a score of 1.0.
    from headrace.models.compress.fidelity import fidelity_for, infer_kind

    rng = np.random.default_rng(3)
    ref = rng.uniform(0.479, 0.504, size=(200, 1))
    assert infer_kind("output", ref) == "other"
    off = ref + np.where(ref > 0.5, 0.01, -0.01)  # errors of ~1.5x the spread, none across 0.5
    assert fidelity_for("binary", ref, off)["score"] == 1.0  # what the gate was held to
    assert fidelity_for(infer_kind("output", ref), ref, off)["score"] < 0.99
    probs = rng.uniform(0.0, 1.0, size=(200, 1))
    assert infer_kind("output", probs) == "binary"


def test_an_fp32_model_holding_a_float16_constant_is_not_taken_for_an_fp16_product(tmp_path: Path) -> None:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from headrace.models.compress.lineage import product_kind
    from headrace.models.repository.manifest import IOSpec
    from headrace.models.repository.store import ModelRepository

    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W")
    eps = nh.from_array(np.array([1e-3], np.float16), "eps16")  # a mixed-precision export's leftover
    graph = h.make_graph([h.make_node("MatMul", ["x", "W"], ["m"]), h.make_node("Cast", ["eps16"], ["eps"], to=T.FLOAT),
                          h.make_node("Add", ["m", "eps"], ["logits"])], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                         [h.make_tensor_value_info("logits", T.FLOAT, ["N", 4])], initializer=[w, eps])
    path = tmp_path / "m.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    repo = ModelRepository(tmp_path / "repo")
    m = repo.add("mixed", {"model.onnx": path}, format="onnx", inputs=[IOSpec("x", "float32", (16,))],
                 outputs=[IOSpec("logits", "float32", (4,))])
    assert product_kind(m, repo.file_path(m, m.model_file)) == ""


def test_a_text_file_saved_with_a_byte_order_mark_does_not_pass_it_on_as_text(tmp_path: Path) -> None:
    from headrace.client.errors import ConfigError
    from headrace.models.compress.data import load_text

    f = tmp_path / "cal.txt"
    f.write_bytes("\ufefffirst text\nsecond\nthird\nfourth\n".encode())
    assert load_text(f).texts[0] == "first text"
    f.write_text("only one\n\n")
    with pytest.raises(ConfigError, match="1 non-blank line; give at least"):
        load_text(f)
