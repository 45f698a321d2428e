"""Import a TensorFlow SavedModel, a Keras model (``.keras`` / ``.h5``) or a ``.tflite`` file,
converted to ONNX with tf2onnx (the ``[tf]`` extra) and served by ONNX Runtime.

* SavedModel: its ``serving_default`` signature, converted by ``python -m tf2onnx.convert
  --saved-model``;
* Keras: loaded with ``keras.models.load_model`` (no unsafe deserialisation), exported as a
  SavedModel (``model.export``), then converted as above;
* ``.tflite``: ``tf2onnx.convert --tflite``; the graph's tensors are renamed to the keys of
  the file's ``serving_default`` signature (``features``, ``probs``) when it has one.

tf2onnx runs in a child process: a conversion failure (or TensorFlow's own crash) becomes a
clear error instead of taking the CLI down, and its log goes to the error message only.
The converted graph is then imported like any ONNX file (signature read from the graph).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from headrace.client.errors import ConfigError, ModelError
from headrace.client.optional import install_command
from headrace.models.importers.common import Imported, ImportOptions

CONVERT_TIMEOUT_S = 600.0


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"converting TensorFlow models needs {module}: {install_command('tf')}")


def convert(args: list[str], out: Path, opset: int) -> None:
    """Run ``python -m tf2onnx.convert ARGS --output OUT``.

    Raises:
        ModelError: the conversion failed (its last log lines are in the message).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "tf2onnx.convert", *args, "--output", str(out), "--opset", str(opset)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise ModelError(f"tf2onnx did not finish in {CONVERT_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ModelError(f"tf2onnx could not convert the model (exit {proc.returncode}):\n{tail}")


def _keras_to_saved_model(path: Path, dst: Path) -> None:
    import keras

    try:
        model = keras.models.load_model(str(path), compile=False, safe_mode=True)
        model.export(str(dst), format="tf_saved_model", verbose=False)
    except Exception as e:  # noqa: BLE001 - keras raises ValueError, OSError, TypeError, ...
        raise ModelError(f"cannot load {path.name} with keras and export it as a SavedModel: {e}") from e


def tflite_names(path: Path) -> dict[str, str]:
    """Tensor name -> signature key of a ``.tflite`` file's ``serving_default`` signature."""
    try:
        interp = tflite_interpreter(path)
        sigs = interp.get_signature_list()
        if not sigs:
            return {}
        runner = interp.get_signature_runner(next(iter(sigs)))
        details = {**runner.get_input_details(), **runner.get_output_details()}
    except (ValueError, RuntimeError):
        return {}
    return {str(d["name"]): str(key) for key, d in details.items()}


def tflite_interpreter(path: Path) -> Any:
    """LiteRT's interpreter (``ai_edge_litert``), else TensorFlow's own (deprecated, to be
    removed in TF 2.20)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=str(path))


def rename_tensors(path: Path, names: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them) in place."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    taken = {v.name for v in list(g.input) + list(g.output)}
    mapping = {old: new for old, new in names.items() if old in taken and new not in taken}
    if not mapping:
        return
    for v in list(g.input) + list(g.output):
        v.name = mapping.get(v.name, v.name)
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    onnx.save(model, str(path))


def import_tensorflow(source: Path, kind: str, opts: ImportOptions, work_dir: Path) -> Imported:
    """An :class:`Imported` ONNX model converted from a SavedModel / Keras / ``.tflite`` source.

    Raises:
        ConfigError: tensorflow or tf2onnx is not installed.
        ModelError: the model does not load or convert.
    """
    from headrace.models.importers.onnx import import_onnx

    _need("tf2onnx")
    _need("tensorflow")
    out = work_dir / "tf2onnx" / "model.onnx"
    if kind == "tflite":
        convert(["--tflite", str(source)], out, opts.opset)
        rename_tensors(out, tflite_names(source))
    else:
        saved = source
        if kind == "keras":
            saved = work_dir / "keras-saved-model"
            _keras_to_saved_model(source, saved)
        convert(["--saved-model", str(saved), "--signature_def", "serving_default"], out, opts.opset)
    imp = import_onnx(out, opts)
    imp.source = source.name
    imp.recipe = [{"step": "convert", "params": {"tool": "tf2onnx", "from": kind, "opset": opts.opset}}]
    imp.notes.append(f"converted from {kind} to ONNX with tf2onnx (opset {opts.opset})")
    return imp
