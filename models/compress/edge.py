"""Edge export: an INT8 TFLite model through onnx2tf, checked by running it in LiteRT.

onnx2tf converts the fp32 ONNX graph to a TensorFlow SavedModel and quantizes it with the
TFLite converter, calibrated on the user's own samples (``custom_input_op_name_np_data_path``).
Inputs keep the ONNX layout (``keep_shape_absolutely_input_names``: no NCHW -> NHWC swap),
and the ONNX input/output names are copied onto the TFLite signature, so a client sends the
same tensors to the TFLite entry as to the ONNX one. The conversion runs in a child process:
TensorFlow's threads and memory never mix with the caller's torch/onnxruntime.

``Erf`` (exact GELU in BERT-family encoders) has no TFLite builtin kernel and would need the
Flex delegate, which plain LiteRT lacks; onnx2tf replaces it with a builtin-op approximation
(``replace_to_pseudo_operators``), whose error the fidelity report measures like any other.

Two kinds: ``integer`` (``*_integer_quant.tflite``: INT8 weights and activations, float I/O)
and ``dynamic`` (``*_dynamic_range_quant.tflite``: INT8 weights, activations quantized per
call; what transformers keep their accuracy with).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError, ModelInputError
from headrace.models.compress.data import Feed

log = logging.getLogger(__name__)

SUFFIX = {"integer": "_integer_quant.tflite", "dynamic": "_dynamic_range_quant.tflite"}
CONVERT_TIMEOUT_S = 1800
# The float32 TFLite file must agree with ONNX Runtime to this cosine per output before its
# INT8 sibling is offered (a correct conversion measures 0.9999+; layout mistakes, far less).
CONVERSION_MIN_COSINE = 0.999

_CHILD = r"""
import json, sys
import onnx2tf
a = json.loads(sys.argv[1])
onnx2tf.convert(input_onnx_file_path=a["onnx"], output_folder_path=a["out"],
                copy_onnx_input_output_names_to_tflite=True, output_signaturedefs=True,
                output_integer_quantized_tflite=a["quant"] == "integer",
                output_dynamic_range_quantized_tflite=a["quant"] == "dynamic", quant_type="per-channel",
                custom_input_op_name_np_data_path=a["cind"] or None,
                keep_shape_absolutely_input_names=a["inputs"],
                replace_to_pseudo_operators=["erf"],
                non_verbose=True, disable_model_save=False)
"""


@dataclass(frozen=True)
class TfliteExport:
    """What an export produced.

    Attributes:
        path: the ``.tflite`` file.
        quant: ``integer`` or ``dynamic``.
        inputs / outputs: signature tensor names (the ONNX names), in ONNX order.
        size_bytes: file size.
        calibration_samples: samples the converter calibrated on (integer only).
        static_shapes: input name -> the shape the graph was frozen to (empty: batch axis free).
        pad: shorter token sequences are zero-padded to the frozen length.
    """

    path: Path
    quant: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    size_bytes: int
    calibration_samples: int
    static_shapes: dict[str, list[int]] = field(default_factory=dict)
    pad: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.path.name
        d.update(inputs=list(self.inputs), outputs=list(self.outputs), converter="onnx2tf")
        return d

    def manifest_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"tflite_inputs": list(self.inputs), "tflite_outputs": list(self.outputs)}
        if self.static_shapes:
            extra.update(tflite_static_shapes=self.static_shapes, tflite_pad=self.pad)
        return extra


def static_shapes(declared: Mapping[str, Sequence[int | None]], sample: Feed, *,
                  seq_length: int = 0) -> dict[str, list[int]]:
    """Every input's frozen shape: the shape of ``sample`` (one calibration sample, so its
    batch axis is 1 wherever that axis is), with the symbolic axis 1 of token inputs
    (``[batch, sequence]``) set to ``seq_length`` when that is given: the longest sequence the
    entry accepts, shorter ones being padded.

    Raises:
        ModelError: the sample lacks an input or disagrees with its declared rank.
    """
    out: dict[str, list[int]] = {}
    for name, dims in declared.items():
        if name not in sample or np.ndim(sample[name]) != len(dims):
            raise ModelError(f"input {name!r} (dims {list(dims)}) has no matching calibration sample to size it")
        shape = [int(v) for v in np.shape(sample[name])]
        if seq_length > 0 and len(dims) == 2 and dims[1] is None:
            shape[1] = int(seq_length)
        out[name] = shape
    return out


def _pad_to(arr: np.ndarray[Any, Any], shape: Sequence[int]) -> np.ndarray[Any, Any]:
    """Zero-pad the trailing axes of ``arr`` up to ``shape`` (the batch axis is kept).

    Raises:
        ModelInputError: ``arr`` is longer than ``shape`` on some axis (the same input never
            fits: answered at once, not retried).
    """
    want = list(shape[1:])
    have = list(arr.shape[1:])
    if len(have) != len(want) or any(h > w for h, w in zip(have, want, strict=True)):
        raise ModelInputError(f"input of shape {list(arr.shape)} does not fit the TFLite model's static shape "
                              f"{list(shape)}")
    return np.pad(arr, [(0, 0)] + [(0, w - h) for h, w in zip(have, want, strict=True)])


def export_tflite(onnx_path: Path, samples: Sequence[Feed], out_dir: Path, *, quant: str = "integer",
                  shapes: Mapping[str, Sequence[int]] | None = None, pad: bool = False) -> TfliteExport:
    """Convert ``onnx_path`` with onnx2tf and quantize it on ``samples`` (one sample each).

    With ``shapes`` the graph is frozen to them first (:mod:`.freeze`); the file then takes one
    sample per call and, with ``pad``, shorter token sequences are zero-padded (mask 0) to fit.

    Raises:
        ModelError: the graph holds ``ai.onnx.ml`` ops (onnx2tf converts none), onnx2tf is
            missing or failed, or the result does not run in LiteRT.
    """
    import importlib.util

    from headrace.models.compress.freeze import freeze_graph
    from headrace.models.compress.source import graph_signature

    _refuse_ml_ops(onnx_path)
    if importlib.util.find_spec("onnx2tf") is None:  # imported by the child process only (TensorFlow)
        raise ModelError('TFLite export needs onnx2tf: pip install "headrace[tf]" and '
                         "pip install --no-deps onnx2tf (its own pins would downgrade numpy/onnx/onnxruntime)")
    declared, outputs = graph_signature(onnx_path)
    ints = [k for k in declared if samples and np.asarray(samples[0][k]).dtype.kind in "iub"]
    if quant == "integer" and ints:
        # onnx2tf feeds its calibration data to the converter as float32 (normalised by mean/std).
        raise ModelError(f"full-integer TFLite calibrates on float inputs; {ints} are integer "
                         "(token ids): use --tflite-quant dynamic")
    out_dir.mkdir(parents=True, exist_ok=True)
    # onnx2tf writes generated op names back into the file it converts: give it a copy, never
    # the caller's (a repository file would no longer match its checksum).
    staged = out_dir / "source.onnx"
    if shapes:
        freeze_graph(onnx_path, staged, shapes)
    else:
        shutil.copyfile(onnx_path, staged)
    cind = _calibration_files(declared, samples, out_dir, shapes) if quant == "integer" else []
    args = {"onnx": str(staged), "out": str(out_dir), "quant": quant, "cind": cind, "inputs": list(declared)}
    _convert(args, onnx_path.name)
    # "*_integer_quant" also matches "*_full_integer_quant" (int8 I/O); the float-I/O file is wanted.
    path = sorted(p for p in out_dir.glob(f"*{SUFFIX[quant]}") if "_full_integer" not in p.name)[0]
    exp = TfliteExport(path, quant, tuple(declared), tuple(outputs), path.stat().st_size,
                       sum(len(next(iter(f.values()))) for f in samples) if quant == "integer" else 0,
                       {k: list(v) for k, v in (shapes or {}).items()}, bool(shapes) and pad)
    litert_run_all(path, 1, exp.manifest_extra())(dict(samples[0]))  # it must run before it is offered
    _check_conversion(onnx_path, out_dir, samples[:4], exp.manifest_extra())
    return exp


def _refuse_ml_ops(onnx_path: Path) -> None:
    """Raises ModelError naming the ``ai.onnx.ml`` ops of the graph (tree ensembles, linear
    classifiers, scalers of sklearn pipelines): onnx2tf has no converter for any of them, and
    letting it try ends in a long traceback that says so less clearly."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ml = sorted({n.op_type for n in model.graph.node if n.domain == "ai.onnx.ml"})
    if ml:
        raise ModelError(f"onnx2tf has no converter for {', '.join(ml)} (ai.onnx.ml): a TFLite file cannot be "
                         "made from this graph")


def _check_conversion(onnx_path: Path, out_dir: Path, samples: Sequence[Feed], extra: Mapping[str, Any]) -> None:
    """onnx2tf's float32 file against ONNX Runtime on a few samples: a layout mistake in the
    conversion shows here as a wrong answer, apart from any quantization error.

    Raises:
        ModelError: an output's cosine to ONNX Runtime is under :data:`CONVERSION_MIN_COSINE`.
    """
    import onnxruntime as ort

    fp32 = sorted(out_dir.glob("*_float32.tflite"))
    if not fp32:
        return
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    run = litert_run_all(fp32[0], 1, extra)
    names = [o.name for o in sess.get_outputs()]
    for feed in samples:
        got = run(dict(feed))
        for name, ref in zip(names, sess.run(names, dict(feed)), strict=True):
            a, b = np.ravel(got[name]).astype(np.float64), np.ravel(ref).astype(np.float64)
            den = float(np.linalg.norm(a) * np.linalg.norm(b))
            cos = float(a @ b) / den if den > 0 else float(np.allclose(a, b, atol=1e-5))
            if cos < CONVERSION_MIN_COSINE:
                raise ModelError(f"onnx2tf's float32 conversion of {onnx_path.name} disagrees with ONNX Runtime "
                                 f"on output {name!r} (cosine {cos:.4f}) before any quantization: a layout the "
                                 "converter guessed wrong; the INT8 file is not offered")


def _calibration_files(declared: Mapping[str, Any], samples: Sequence[Feed], out_dir: Path,
                       shapes: Mapping[str, Sequence[int]] | None) -> list[list[Any]]:
    cind = []
    for name in declared:
        rows = [np.asarray(f[name]) for f in samples]
        if shapes:
            rows = [_pad_to(r, shapes[name]) for r in rows]
        np.save(out_dir / f"cal-{name}.npy", np.concatenate(rows).astype(np.float32))
        cind.append([name, str(out_dir / f"cal-{name}.npy"), 0.0, 1.0])
    return cind


# TensorFlow's start-up lines (absl info/warning lines, the oneDNN and CUDA notices), which
# say nothing about why a conversion failed
_TF_NOISE = re.compile(r"^([IW]\d{4} |WARNING: All log messages before absl|off, set the environment variable)")


def _convert(args: Mapping[str, Any], source_name: str) -> None:
    """Run onnx2tf in a child process.

    Raises:
        ModelError: it failed, timed out or wrote no file of the wanted kind.
    """
    try:
        # onnx2tf runs the onnxsim command line when it is installed: put this interpreter's
        # scripts folder first on PATH so a virtual environment's copy is found unactivated.
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        # TensorFlow's C++ info lines would fill the error's tail, hiding onnx2tf's own reason
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                              timeout=CONVERT_TIMEOUT_S, check=False, env=env)
    except subprocess.TimeoutExpired as e:
        raise ModelError(f"onnx2tf did not finish in {CONVERT_TIMEOUT_S}s") from e
    found = [p for p in Path(args["out"]).glob(f"*{SUFFIX[args['quant']]}") if "_full_integer" not in p.name]
    if proc.returncode != 0 or not found:
        said = ["\n".join(ln for ln in (out or "").splitlines() if not _TF_NOISE.match(ln)).strip()
                for out in (proc.stderr, proc.stdout)]
        tail = (said[0] or said[1])[-1500:] or "(no message)"
        how = f"exit {proc.returncode}"
        if proc.returncode < 0:
            with contextlib.suppress(ValueError):
                how = f"crashed with {signal.Signals(-proc.returncode).name}: onnx2tf cannot convert this graph here"
        raise ModelError(f"onnx2tf failed on {source_name} ({how}): {tail}")


class LiteRTRunner:
    """A LiteRT interpreter fed by tensor name; the batch (and any dynamic) axis is resized per
    call. Uses the model's signature runner when it has exactly one signature, and the
    interpreter's input/output tensors otherwise (onnx2tf's dynamic-range files carry none).

    Raises:
        ModelError: LiteRT is missing or cannot load the file.
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        from headrace.client.optional import require

        Interpreter = require("ai_edge_litert.interpreter", "litert", purpose="running TFLite entries").Interpreter
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=max(1, threads))
            sigs = self.interpreter.get_signature_list()
            self.runner = self.interpreter.get_signature_runner() if len(sigs) == 1 else None
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"LiteRT cannot load {Path(path).name}: {e}") from e
        if self.runner is not None:
            details = self.runner.get_input_details()
            self.input_dtypes = {k: np.dtype(v["dtype"]) for k, v in details.items()}
            self.output_names = tuple(self.runner.get_output_details())
        else:
            self._inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
            self._outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
            self.input_dtypes = {k: np.dtype(v["dtype"]) for k, v in self._inputs.items()}
            self.output_names = tuple(self._outputs)
        self.input_names = tuple(self.input_dtypes)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _invoke_tensors(self, args: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        it = self.interpreter
        if any(self._shapes.get(k) != v.shape for k, v in args.items()):
            for k, v in args.items():
                it.resize_tensor_input(self._inputs[k]["index"], list(v.shape), strict=False)
            it.allocate_tensors()
            self._shapes = {k: v.shape for k, v in args.items()}
        for k, v in args.items():
            it.set_tensor(self._inputs[k]["index"], v)
        it.invoke()
        return {k: np.array(it.get_tensor(d["index"])) for k, d in self._outputs.items()}

    def run(self, feed: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """One call; ``feed`` keys are the model's input names.

        Raises:
            ModelError: a missing input or a LiteRT failure.
        """
        missing = [k for k in self.input_names if k not in feed]
        if missing:
            raise ModelError(f"LiteRT model wants inputs {list(self.input_names)}; missing {missing}")
        args = {k: np.ascontiguousarray(feed[k], dtype=self.input_dtypes[k]) for k in self.input_names}
        try:
            if self.runner is not None:
                return {k: np.asarray(v) for k, v in self.runner(**args).items()}
            return self._invoke_tensors(args)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"LiteRT run failed: {e}") from e


def _sig_name(name: str) -> str:
    # onnx2tf copies ONNX names onto the signature, replacing characters TF does not allow.
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def litert_run_all(path: str | Path, threads: int, extra: Mapping[str, Any]) -> Any:
    """feed (ONNX names) -> outputs (ONNX names) through :class:`LiteRTRunner`.

    A file frozen to static shapes (``extra.tflite_static_shapes``) is run one sample at a
    time; with ``extra.tflite_pad`` shorter token inputs are zero-padded to the frozen length
    and outputs that carry that length are cut back to the input's.

    Raises:
        ModelError: (from the returned function) an input does not fit the frozen shape.
    """
    r = LiteRTRunner(path, threads)
    inputs = _mapping(list(extra.get("tflite_inputs", r.input_names)), r.input_names)
    outputs = _mapping(list(extra.get("tflite_outputs", r.output_names)), r.output_names)
    frozen: Mapping[str, Sequence[int]] = extra.get("tflite_static_shapes") or {}
    pad = bool(extra.get("tflite_pad", False))

    def run(feed: Feed) -> dict[str, np.ndarray[Any, Any]]:
        got = r.run({sig: feed[onnx] for onnx, sig in inputs.items()})
        return {onnx: got[sig] for onnx, sig in outputs.items()}

    def run_frozen(feed: Feed) -> dict[str, np.ndarray[Any, Any]]:
        arrays = {k: np.asarray(feed[k]) for k in inputs}
        if all(list(a.shape) == list(frozen[k]) for k, a in arrays.items()):
            return run(arrays)
        for k, a in arrays.items():  # split along axis 0 only where it is the batch axis of every input
            if list(frozen[k])[:1] != [1] or (not pad and list(a.shape[1:]) != list(frozen[k][1:])):
                raise ModelError(f"input {k!r} of shape {list(a.shape)}: this TFLite model takes {list(frozen[k])}")
        rows = len(next(iter(arrays.values())))
        length = max((a.shape[1] for a in arrays.values() if a.ndim > 1), default=0)
        parts = [run({k: _pad_to(a[i:i + 1], frozen[k]) for k, a in arrays.items()}) for i in range(rows)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in outputs}
        seq = max((v[1] for v in frozen.values() if len(v) > 1), default=0)
        if pad and length < seq:  # token-aligned outputs ([B, S, ...]) back to the sent length
            out = {k: v[:, :length] if v.ndim > 2 and v.shape[1] == seq else v for k, v in out.items()}
        return out

    return run_frozen if frozen else run


def _mapping(wanted: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """ONNX name -> signature name: by name (as copied by onnx2tf), else by position when
    the converter numbered them (``output_0``...) and the counts agree.

    Raises:
        ModelError: the names cannot be matched.
    """
    out = {w: (w if w in names else _sig_name(w)) for w in wanted}
    if all(v in names for v in out.values()):
        return out
    numbered = sorted(names, key=lambda n: (len(n), n))
    if len(numbered) == len(wanted):
        return dict(zip(wanted, numbered, strict=True))
    raise ModelError(f"the TFLite signature tensors {list(names)} do not match {list(wanted)}")
