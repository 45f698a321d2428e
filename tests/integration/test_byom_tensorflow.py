"""TensorFlow models (the ``[tf]`` extra: tensorflow + tf2onnx) built here, added with
``headrace models add`` (converted by tf2onnx), served by ``headrace worker``: a Keras model
and a ``.tflite`` file, outputs equal TensorFlow's own within 1e-5.

TensorFlow is imported once, by the session fixture ``tf_models``, which builds both files
and TensorFlow's reference outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.models.importers.tensorflow import tflite_interpreter
from tests.support.byom import latest, max_batch_seen, models_add, raw_infer, sdk_infer, serving

pytestmark = pytest.mark.timeout(420)

pytest.importorskip("tf2onnx", reason="the [tf] extra (tensorflow, tf2onnx) is not installed")


@pytest.fixture(scope="session")
def tf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("tf")
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(16, activation="tanh")(inp)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(hidden)
    model = keras.Model(inp, out)
    model.save(folder / "clf.keras")
    tflite = folder / "clf.tflite"
    tflite.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    interp = tflite_interpreter(tflite)
    runner = interp.get_signature_runner()
    lite_out = np.concatenate([next(iter(runner(features=x[i:i + 1]).values())) for i in range(len(x))])
    return {"keras": folder / "clf.keras", "tflite": tflite, "x": x,
            "keras_out": np.asarray(model(x, training=False)), "tflite_out": lite_out}


@pytest.mark.parametrize("kind", ["keras", "tflite"])
def test_tensorflow_models_equal_tensorflow(kind: str, tf_models: dict[str, Any], redis_url: str,
                                            tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    proc = models_add(repo, kind, tf_models[kind])
    assert "tf2onnx" in proc.stdout
    m = latest(repo, kind)
    assert [(s.name, s.shape) for s in m.inputs] == [("features", (6,))]
    out_name = m.outputs[0].name
    assert m.outputs[0].shape == (3,)
    x = tf_models["x"]
    with serving(redis_url, repo, kind, tmp_path / "worker.log", "--max-batch", "16"):
        sdk = sdk_infer(redis_url, kind, [{"features": row} for row in x])
        raw = raw_infer(redis_url, kind, [{"features": row} for row in x])
    expected = tf_models[f"{kind}_out"]
    np.testing.assert_allclose(np.stack([r.outputs[out_name] for r in sdk]), expected, atol=1e-5)
    np.testing.assert_allclose(np.stack([r["outputs"][out_name] for r in raw]), expected, atol=1e-5)
    assert max_batch_seen(sdk) > 1 and max_batch_seen(raw) > 1
