"""The digits model: seeded training, files, ONNX export, repository round trip, serving,
and the compress pipeline end to end on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headrace.client.errors import ConfigError, ModelNotFoundError
from headrace.client.protocol import Envelope, Request
from headrace.models.builtin import digits as DG
from headrace.models.repository.store import ModelRepository


@pytest.fixture(scope="module")
def trained() -> tuple[DG.DigitsMLP, DG.TrainReport, DG.DigitsData]:
    data = DG.load_data()
    model, rep = DG.train(data, epochs=20)
    return model, rep, data


def test_split_is_stratified_and_seeded() -> None:
    a, b = DG.load_data(seed=1), DG.load_data(seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.x_train.shape == (1347, 64) and a.x_test.shape == (450, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert set(np.bincount(a.y_test)) <= {43, 44, 45, 46}  # stratified: every class ~10%
    with pytest.raises(ConfigError):
        DG.load_data(test_fraction=0.0)


def test_training_is_deterministic_and_accurate(trained: tuple[DG.DigitsMLP, DG.TrainReport, DG.DigitsData]) -> None:
    model, rep, data = trained
    again, rep2 = DG.train(data, epochs=20)
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rep.test_accuracy == rep2.test_accuracy >= 0.95
    assert rep.test_accuracy == pytest.approx(DG.accuracy(model, data.x_test, data.y_test))


def test_files_roundtrip_without_pickle(trained: tuple[DG.DigitsMLP, DG.TrainReport, DG.DigitsData],
                                       tmp_path: Path) -> None:
    model, _, data = trained
    files = DG.save(model, tmp_path)
    assert sorted(p.name for p in files) == [DG.CONFIG_FILE, DG.WEIGHTS_FILE]
    assert json.loads((tmp_path / DG.CONFIG_FILE).read_text()) == {"hidden_sizes": [256, 128]}
    loaded = DG.load(tmp_path)
    np.testing.assert_array_equal(DG.predict_logits(loaded, data.x_test), DG.predict_logits(model, data.x_test))
    with pytest.raises(ModelNotFoundError):
        DG.load(tmp_path / "nowhere")


def test_onnx_export_matches_torch(trained: tuple[DG.DigitsMLP, DG.TrainReport, DG.DigitsData], tmp_path: Path) -> None:
    model, _, data = trained
    rep = DG.export(model, tmp_path / "d.onnx")
    assert rep.max_abs_diff < 1e-4
    onnx_logits = DG.onnx_logits(tmp_path / "d.onnx", data.x_test)
    np.testing.assert_allclose(onnx_logits, DG.predict_logits(model, data.x_test), atol=1e-4)
    # (B, 8, 8) images work in torch too: the model flattens.
    torch_img = DG.predict_logits(model, data.x_test[:5].reshape(5, 8, 8))
    np.testing.assert_allclose(torch_img, DG.predict_logits(model, data.x_test[:5]), atol=1e-6)


def test_repository_roundtrip_and_serving(trained: tuple[DG.DigitsMLP, DG.TrainReport, DG.DigitsData],
                                          tmp_path: Path) -> None:
    from headrace.workers.backends import load_servable
    from headrace.workers.settings import WorkerSettings

    model, rep, data = trained
    repo = ModelRepository(tmp_path / "repo")
    m = DG.add_to_repository(repo, model, measured={"test_accuracy": rep.test_accuracy})
    assert (m.name, m.version, m.format, m.precision) == ("digits", "1", "onnx", "fp32")
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("image", "float32", (64,))]
    assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [("logits", "float32", (10,))]
    verified = repo.verify("digits", "1")
    assert {f.path for f in verified.files} == {"model.onnx", DG.WEIGHTS_FILE, DG.CONFIG_FILE}
    assert verified.measured["test_accuracy"] == rep.test_accuracy

    s = load_servable(WorkerSettings(model="digits", model_repo=str(repo.root), intra_op_threads=1))
    reqs = [Request(Envelope(f"r{i}", "reply"), inputs={"image": data.x_test[i]}) for i in range(12)]
    for r in reqs:
        s.check(r)
    out = s.infer(reqs)
    pred = np.array([o["logits"].argmax() for o in out])
    np.testing.assert_array_equal(pred, DG.predict_logits(model, data.x_test[:12]).argmax(1))
    s.close()
    # The torch weights stored beside the graph load through the manifest's factory.
    folder = repo.path("digits", "1")
    np.testing.assert_allclose(DG.predict_logits(DG.torch_factory(folder, verified), data.x_test[:3]),
                               DG.predict_logits(model, data.x_test[:3]), atol=0)


@pytest.mark.timeout(240)
def test_compress_pipeline_on_digits(tmp_path: Path) -> None:
    """``headrace compress digits`` end to end (small settings): artifacts, measured figures,
    the table and the plot."""
    from rich.console import Console

    from headrace.models.compress.pipeline import CompressOptions, compress_main

    con = Console(record=True, width=220)
    res = compress_main(CompressOptions(model="digits", steps=("quantize-dynamic", "prune", "fp16", "tensorrt"),
                                        repo=tmp_path / "repo", work_dir=tmp_path / "work", threads=1,
                                        progress=False), console=con)
    names = [a.split("/")[0] for a in res.artifacts]
    assert [n for n in names if "-trt-" not in n] == ["digits", "digits-int8", "digits-pruned", "digits-pruned-int8",
                                                      "digits-fp16"]
    rows = {r.label: r for r in res.rows}
    assert set(rows) - {"trt fp16"} == {"fp32 torch", "fp32 onnx", "int8 dynamic", "pruned fp32", "pruned int8",
                                        "fp16 onnx"}
    assert rows["fp32 onnx"].fidelity["agreement"] > 0.99
    assert rows["int8 dynamic"].fidelity["accuracy"] >= rows["fp32 torch"].fidelity["accuracy"] - 0.02
    assert rows["pruned fp32"].params < rows["fp32 torch"].params
    assert rows["pruned fp32"].fidelity["accuracy"] >= rows["fp32 torch"].fidelity["accuracy"] - 0.03
    assert set(rows["int8 dynamic"].throughput) == {1, 8, 32} and not rows["fp16 onnx"].throughput
    repo = ModelRepository(tmp_path / "repo")
    measured = repo.load_manifest("digits-int8").measured
    assert measured["fidelity"]["accuracy"] == rows["int8 dynamic"].fidelity["accuracy"]
    assert set(measured["throughput_per_s"]) == {"1", "8", "32"} and measured["bench"]["threads"] == 1
    assert "tensorrt" in res.skipped or "digits-trt-fp16" in names
    assert res.plot is not None and res.plot.stat().st_size > 10_000
    assert "pruned int8" in con.export_text() and "| int8 dynamic |" in res.markdown
