"""Bring your own ONNX model: models nobody here wrote, added with ``headrace models add``,
served by ``headrace worker``, answered through the SDK and a raw Redis producer.

* a scikit-learn pipeline converted with skl2onnx on the bundled iris data: outputs equal
  sklearn's ``predict`` / ``predict_proba``;
* silero-vad's own ONNX file (package ``silero-vad``): its ``state`` carries the batch on
  axis 1 and ``sr`` has no batch axis, so it is served batched with per-input batch axes;
  answers equal silero's own ``OnnxWrapper`` run on each chunk alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import Client
from headrace.client.errors import UnknownModel
from tests.support.byom import (
    HEADRACE,
    category_mapper,
    describe,
    latest,
    max_batch_seen,
    models_add,
    raw_infer,
    sdk_infer,
    serving,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, np.ndarray[Any, Any]]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    onx = to_onnx(clf, x[:1], options={LogisticRegression: {"zipmap": False}}, target_opset=17)
    path = tmp_path_factory.mktemp("iris") / "iris.onnx"
    path.write_bytes(onx.SerializeToString())
    return path, clf, x


def test_sklearn_iris_outputs_equal_sklearn(iris: Any, redis_url: str, tmp_path: Path) -> None:
    path, clf, x = iris
    repo = tmp_path / "repo"
    proc = models_add(repo, "iris", path, "--description", "iris logistic regression")
    assert "probabilities" in proc.stdout and "[B,4]" in proc.stdout  # the signature table
    m = latest(repo, "iris")
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("X", "float32", (4,))]
    assert {s.name: s.shape for s in m.outputs} == {"label": (), "probabilities": (3,)}
    rows = x[::5]
    with serving(redis_url, repo, "iris", tmp_path / "worker.log", "--max-batch", "16"):
        sdk = sdk_infer(redis_url, "iris", [{"X": row} for row in rows])
        raw = raw_infer(redis_url, "iris", [{"X": row} for row in rows])
        described = describe(redis_url, "iris")
        with Client(redis_url) as c, pytest.raises(UnknownModel, match="'irsi'"):
            c.submit("irsi", {"X": rows[0]})  # a misspelt model, while iris is served
        assert redis.Redis.from_url(redis_url).hget("headrace:models", "irsi") is None  # the raw producer's check
        np.save(tmp_path / "sample.npy", rows[0])  # the README's third command
        submitted = subprocess.run([*HEADRACE, "--redis-url", redis_url, "submit", "iris", "--input",
                                    f"X={tmp_path / 'sample.npy'}", "--json"], capture_output=True, text=True,
                                   timeout=60, check=False)
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["outputs"]["label"]["data"] == int(clf.predict(rows[:1])[0])  # a scalar
    assert described["versions"] == ["1"] and described["platform"] == "onnxruntime_onnx"
    assert described["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4], "sample_shape": [4],
                                    "dtype": "float32"}]
    assert described["max_batch_size"] == 16 and described["description"] == "iris logistic regression"
    labels, probs = clf.predict(rows), clf.predict_proba(rows)
    for got in ([r.outputs for r in sdk], [r["outputs"] for r in raw]):
        np.testing.assert_array_equal(np.array([g["label"] for g in got]), labels)
        np.testing.assert_allclose(np.stack([g["probabilities"] for g in got]), probs, atol=1e-5)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1


def test_describe_of_a_model_no_worker_registered_says_so(redis_url: str) -> None:
    proc = subprocess.run([*HEADRACE, "--redis-url", redis_url, "models", "describe", "irsi"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "[unknown_model] no worker has ever registered model 'irsi'" in proc.stderr


def test_models_add_on_an_existing_name_publishes_the_next_version(iris: Any, tmp_path: Path) -> None:
    path, _, _ = iris
    repo = tmp_path / "repo"
    models_add(repo, "iris", path)
    models_add(repo, "iris", path, "--max-batch", "8")
    m = latest(repo, "iris")
    assert (m.version, m.max_batch) == ("2", 8)
    assert {f.path for f in m.files} == {"model.onnx", "example.npz"}
    bad = models_add(repo, "iris", path, "--version", "2", expect_ok=False)
    assert bad.returncode != 0 and "already exists" in bad.stderr


SILERO_ARGS = ("--input", "input:float32:-1", "--input", "state:float32:2,B,128", "--input", "sr:int64::nobatch",
               "--output", "output:float32:1", "--output", "stateN:float32:2,B,128")


def _silero_onnx() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"


def test_silero_onnx_needs_the_batch_axis_of_state_named(tmp_path: Path) -> None:
    proc = models_add(tmp_path / "repo", "vad", _silero_onnx(), expect_ok=False)
    assert proc.returncode != 0
    assert "state" in proc.stderr and "2,B,128" in proc.stderr  # says what to pass


def test_silero_onnx_served_batched_with_per_input_batch_axes(redis_url: str, tmp_path: Path) -> None:
    import torch
    from silero_vad.utils_vad import OnnxWrapper

    rng = np.random.default_rng(0)
    chunks = [(rng.standard_normal(512) * (0.02 if i % 2 else 0.3)).astype(np.float32) for i in range(12)]
    context = np.zeros(64, np.float32)  # silero's wrapper prepends 64 samples of context (zeros at start)
    example = tmp_path / "vad.npz"
    np.savez(example, input=np.concatenate([context, chunks[0]])[None], state=np.zeros((2, 1, 128), np.float32),
             sr=np.array(16000, np.int64))
    repo = tmp_path / "repo"
    proc = models_add(repo, "vad", _silero_onnx(), *SILERO_ARGS, "--example", str(example))
    assert "[2,B,128]" in proc.stdout and "shared by a call" in proc.stdout
    m = latest(repo, "vad")
    assert {s.name: s.batch_axis for s in m.inputs} == {"input": 0, "state": 1, "sr": -1}
    samples = [{"input": np.concatenate([context, c]), "state": np.zeros((2, 128), np.float32),
                "sr": np.array(16000, np.int64)} for c in chunks]
    with serving(redis_url, repo, "vad", tmp_path / "worker.log", "--max-batch", "16"):
        sdk = sdk_infer(redis_url, "vad", samples)
        raw = raw_infer(redis_url, "vad", samples)
        described = describe(redis_url, "vad")
    shapes = {x["name"]: (x["shape"], x["sample_shape"], x.get("batch_axis", 0)) for x in described["inputs"]}
    assert shapes == {"input": ([-1, -1], [-1], 0), "state": ([2, -1, 128], [2, 128], 1), "sr": ([], [], -1)}
    ref = OnnxWrapper(str(_silero_onnx()))
    expected = []
    for c in chunks:
        ref.reset_states()
        expected.append(float(ref(torch.from_numpy(c[None]), 16000).numpy().reshape(-1)[0]))
    for got in ([r.outputs for r in sdk], [r["outputs"] for r in raw]):
        assert all(g["stateN"].shape == (2, 128) for g in got)
        np.testing.assert_allclose([float(g["output"][0]) for g in got], expected, atol=1e-5)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1


def _external_data_model(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.weights", size_threshold=0)
    return path


def test_onnx_external_data_is_listed_and_a_failing_example_refuses_the_add(tmp_path: Path) -> None:
    path = _external_data_model(tmp_path)
    repo = tmp_path / "repo"
    dry = models_add(repo, "ext", path, "--dry-run")
    assert "dry run" in dry.stdout and not (repo / "ext").exists()
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.ones((2, 5), np.float32))  # 5 features; the model takes 4
    refused = models_add(repo, "ext", path, "--example", str(bad), expect_ok=False)
    assert refused.returncode == 1 and "ext was not added" in refused.stderr and "[4]" in refused.stderr
    assert not (repo / "ext").exists() or not list((repo / "ext").iterdir())
    models_add(repo, "ext", path)
    m = latest(repo, "ext")
    assert {f.path for f in m.files} == {"model.onnx", "ext.weights", "example.npz"}
    (path.parent / "ext.weights").unlink()
    missing = models_add(repo, "ext", path, expect_ok=False)
    assert "keeps weights in 'ext.weights'" in missing.stderr


def test_skl2onnx_zipmap_output_is_left_out_with_a_note(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True)
    clf = DecisionTreeClassifier(max_depth=3, random_state=0).fit(x.astype(np.float32), y)
    path = tmp_path / "tree.onnx"
    path.write_bytes(to_onnx(clf, x[:1].astype(np.float32)).SerializeToString())  # default: ZipMap on
    proc = models_add(tmp_path / "repo", "tree", path)
    assert "output_probability" in proc.stdout and "zipmap" in proc.stdout
    assert [s.name for s in latest(tmp_path / "repo", "tree").outputs] == ["output_label"]


def test_an_output_summed_over_the_batch_answers_each_request_with_its_own_value(redis_url: str,
                                                                                  tmp_path: Path) -> None:
    # Served batched, each request of a call would get the sum over its call-mates' inputs
    # too: wrong, and a leak of other producers' data. The importer reads that from the graph.
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    graph = h.make_graph([h.make_node("ReduceSum", ["x"], ["s"], keepdims=0)], "sum",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                         [h.make_tensor_value_info("s", T.FLOAT, [])])
    path = tmp_path / "sum.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 11)]), str(path))
    repo = tmp_path / "repo"
    proc = models_add(repo, "total", path)
    assert "max 1 per call" in proc.stdout and "no batch axis but is computed from the batched" in proc.stdout
    rows = [np.full(4, i, np.float32) for i in range(1, 13)]
    with serving(redis_url, repo, "total", tmp_path / "worker.log", "--max-batch", "16"):
        results = sdk_infer(redis_url, "total", [{"x": r} for r in rows])
        raw = raw_infer(redis_url, "total", [{"x": r} for r in rows[:4]])
    assert [float(r.outputs["s"]) for r in results] == [4.0 * i for i in range(1, 13)]
    assert max_batch_seen(results) == 1
    assert [float(np.asarray(r["outputs"]["s"])) for r in raw] == [4.0, 8.0, 12.0, 16.0]


def test_indices_counted_over_the_call_answer_each_request_with_its_own(redis_url: str, tmp_path: Path) -> None:
    # NonZero's [K, 2] has a dynamic leading dim the graph cannot tell from the batch; served
    # batched, every call would fail on splitting K rows into n requests. The importer runs
    # the model at two batch sizes, sees K does not follow, and serves it one request per call.
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    graph = h.make_graph(
        [h.make_node("Greater", ["x", "zero"], ["g"]), h.make_node("NonZero", ["g"], ["idx"]),
         h.make_node("Transpose", ["idx"], ["where"])], "nonzero",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])], [h.make_tensor_value_info("where", T.INT64, ["K", 2])],
        initializer=[nh.from_array(np.zeros((), np.float32), "zero")])
    path = tmp_path / "nonzero.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    repo = tmp_path / "repo"
    proc = models_add(repo, "where", path)
    assert "max 1 per call" in proc.stdout and "does not follow the batch" in proc.stdout
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(4).astype(np.float32) for _ in range(10)]
    with serving(redis_url, repo, "where", tmp_path / "worker.log", "--max-batch", "16"):
        results = sdk_infer(redis_url, "where", [{"x": r} for r in rows])
        raw = raw_infer(redis_url, "where", [{"x": r} for r in rows[:3]])
    # alone, row r is the model's batch of one: its indices are (0, column) for each positive value
    expected = [np.stack([np.zeros(int((r > 0).sum()), np.int64), np.flatnonzero(r > 0)], axis=1) for r in rows]
    assert all(r.status == "ok" for r in results)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got.outputs["where"]).reshape(-1, 2), want)
    for got, want in zip(raw, expected[:3], strict=True):
        np.testing.assert_array_equal(np.asarray(got["outputs"]["where"]).reshape(-1, 2), want)
    assert max_batch_seen(results) == 1


def test_string_labels_are_served_as_string_tensors(redis_url: str, tmp_path: Path) -> None:
    # A classifier fitted on class names answers with strings (skl2onnx: a tensor(string)
    # label), docs/protocol.md's "string" tensors: through single requests, multi-sample
    # entries (map, map_arrays), a raw producer and headrace submit --batch --output.
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    data = load_iris()
    x = data.data.astype(np.float32)
    clf = LogisticRegression(max_iter=1000).fit(x, data.target_names[data.target])
    labeller = tmp_path / "labels.onnx"
    labeller.write_bytes(to_onnx(clf, x[:1], options={LogisticRegression: {"zipmap": False}},
                                 target_opset=17).SerializeToString())
    repo = tmp_path / "repo"
    proc = models_add(repo, "labels", labeller)
    assert {s.name: s.dtype for s in latest(repo, "labels").outputs} == {"label": "string", "probabilities": "float32"}
    assert "string" in proc.stdout
    rows = x[::10]
    np.save(tmp_path / "rows.npy", rows)
    with serving(redis_url, repo, "labels", tmp_path / "labels.log", "--max-batch", "8"):
        single = sdk_infer(redis_url, "labels", [{"X": r} for r in rows])
        raw = raw_infer(redis_url, "labels", [{"X": r} for r in rows[:4]])
        with Client(redis_url) as c:
            mapped = c.map("labels", [{"X": r} for r in rows], chunk_size=4)
            bulk = c.map_arrays("labels", {"X": rows}, chunk_size=4)
        batch = subprocess.run([*HEADRACE, "--redis-url", redis_url, "submit", "labels", "--input",
                                f"X={tmp_path / 'rows.npy'}", "--batch", "--output", str(tmp_path / "out.npz")],
                               capture_output=True, text=True, timeout=60, check=False)
    want = list(clf.predict(rows))
    assert batch.returncode == 0, batch.stderr
    with np.load(tmp_path / "out.npz", allow_pickle=False) as saved:  # strings saved without pickle
        assert saved["label"].tolist() == want and saved["ok"].all()
    assert [str(r.outputs["label"]) for r in single] == want
    assert all(isinstance(r.outputs["label"], np.ndarray) and r.outputs["label"].shape == () for r in single)
    assert [str(r["outputs"]["label"]) for r in raw] == want[:4]
    assert [str(r.outputs["label"]) for r in mapped] == want
    assert list(bulk.outputs["label"]) == want
    np.testing.assert_allclose(bulk.outputs["probabilities"], clf.predict_proba(rows), rtol=1e-4, atol=1e-5)


def test_string_inputs_are_taken_as_string_tensors(redis_url: str, tmp_path: Path) -> None:
    # A category lookup takes strings: from the SDK, a raw producer, map and a JSON file for
    # headrace submit; a number sent for the word is bad_dtype.
    repo = tmp_path / "repo"
    models_add(repo, "lookup", category_mapper(tmp_path / "lookup.onnx", ["setosa", "versicolor", "virginica"]))
    assert [(s.name, s.dtype, s.shape) for s in latest(repo, "lookup").inputs] == [("word", "string", ())]
    sent = ["virginica", "setosa", "rose", "versicolor", ""]
    (tmp_path / "word.json").write_text(json.dumps({"word": "virginica"}))  # a bare JSON string
    with serving(redis_url, repo, "lookup", tmp_path / "lookup.log", "--max-batch", "8"):
        single = sdk_infer(redis_url, "lookup", [{"word": np.array(w)} for w in sent])
        raw = raw_infer(redis_url, "lookup", [{"word": np.array(w)} for w in sent])
        with Client(redis_url) as c:
            mapped = c.map("lookup", [{"word": np.array(w)} for w in sent], chunk_size=3)
            bad = c.submit("lookup", {"word": np.array(3, dtype=np.int64)}).result(timeout_s=30)
        cli = subprocess.run([*HEADRACE, "--redis-url", redis_url, "submit", "lookup", "--input",
                              str(tmp_path / "word.json"), "--json"], capture_output=True, text=True, timeout=60,
                             check=False)
    codes = [2, 0, -1, 1, -1]
    assert [int(r.outputs["code"]) for r in single] == codes
    assert [int(r["outputs"]["code"]) for r in raw] == codes
    assert [int(r.outputs["code"]) for r in mapped] == codes
    assert not bad.ok and bad.code == "bad_dtype"
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["outputs"]["code"]["data"] == 2
