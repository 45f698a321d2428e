"""ONNX Runtime servable: any ONNX model described by a repository manifest.

Text models (``preprocess: bert_tokenizer``) are tokenised here; every other model is a
generic tensor-in/tensor-out graph driven by the manifest signature alone, so a user's
folder with ``model.onnx`` and a manifest is servable without code.

Execution providers are taken in the order TensorRT, CUDA, CPU among those this
onnxruntime build offers; if a GPU provider fails to initialise (missing libraries, no
device) the session is created again with the next ones, so a worker still comes up on CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.optional import WORKER, require
from headrace.models.repository.store import Manifest
from headrace.workers.backends import prepost, signature, tokens

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: Sequence[str], requested: Sequence[str] | None = None) -> list[str]:
    """Providers to try, best first: ``requested`` (if given) or TensorRT > CUDA > CPU,
    filtered to those ``available``; CPU is always last as the fallback.

    Raises:
        ConfigError: a requested provider is not available in this onnxruntime build.
    """
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise E.ConfigError(f"execution providers {missing} are not in this onnxruntime build "
                                f"(available: {list(available)}); install onnxruntime-gpu or drop them")
        chosen = list(requested)
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _provider_options(name: str, manifest: Manifest, cache_dir: Path) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        # Engines are built per input-shape profile and take minutes; cache them on disk so a
        # restarted replica does not rebuild.
        cache_dir.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                "trt_fp16_enable": manifest.precision in {"fp16", "mixed"},
                "trt_int8_enable": False}
    return {}


#: how far the process may grow past its size after loading the model before runs give the
#: onnxruntime CPU arena's free memory back (bytes).
SHRINK_ABOVE_BYTES = 512 << 20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident memory (bytes; 0 where ``/proc`` is missing: never shrink)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


class OnnxServable(prepost.ManifestServable):
    """A manifest-described ONNX model on an onnxruntime ``InferenceSession``.

    Args:
        manifest: the version's manifest (signature, pre/post-processing, max_batch).
        model_path: the verified ``model.onnx``.
        tokenizer_path: ``tokenizer.json`` for text models.
        allow_spinning: idle intra-op threads spin-wait (see ``WorkerSettings.ort_spin``).
        intra_op_threads: onnxruntime intra-op threads (0 = onnxruntime default).
        providers: explicit execution providers; None = best available.
        reject_non_finite: answer ``bad_value`` for float inputs holding NaN/Inf.

    Raises:
        ModelError: the session cannot be created, or the graph does not match the manifest
            (names, dtypes, ranks, batch axes, fixed dims; see :mod:`.signature`).
        MissingDependencyError: onnxruntime is not installed (``[worker-cpu]`` / ``[worker-gpu]``).
    """

    def __init__(self, manifest: Manifest, model_path: Path, *, tokenizer_path: Path | None = None,
                 intra_op_threads: int = 0, providers: Sequence[str] | None = None,
                 reject_non_finite: bool = True, allow_spinning: bool = False) -> None:
        ort = require("onnxruntime", WORKER, purpose="the ONNX backend")

        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.accepts_text = manifest.accepts_text
        self.inputs = prepost.specs(manifest.inputs)
        self.outputs = prepost.specs(manifest.outputs)
        self.reject_non_finite = reject_non_finite
        self._output_names = [s.name for s in self.outputs]
        self._encoder: tokens.TextEncoder | None = None

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if intra_op_threads > 0:
            opts.intra_op_num_threads = intra_op_threads
        # One run at a time per worker already: a second inter-op pool would only compete.
        opts.inter_op_num_threads = 1
        # Spinning idle threads burn the cores the event loop, Redis and producers need
        # between batches (WorkerSettings.ort_spin).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        chain = choose_providers(ort.get_available_providers(), providers)
        cache = Path(os.environ.get("HEADRACE_TRT_CACHE", Path.home() / ".cache" / "headrace" / "trt"))
        cache = cache / f"{manifest.name}-{manifest.version}"
        self.session: Any = None
        self._run_options = ort.RunOptions()
        # Failed runs are raised to the worker, which logs them once per request; onnxruntime's
        # own ERROR line per failed node would double that on stderr (a producer sending
        # samples the model refuses would fill it).
        self._run_options.log_severity_level = 4
        # A run that ends with the process past SHRINK_ABOVE_BYTES over its size after loading
        # makes the next run give the CPU arena's free chunks back to the OS: otherwise one
        # request that makes a model allocate gigabytes (a ConstantOfShape sized by its
        # values) leaves the worker holding them for good. Not every run: shrinking frees and
        # re-faults the arena each time; benchmarks/arena_shrink.py found that within noise on
        # CPU (0.94-1.07x), so it is kept for when it pays rather than paid on every batch.
        self._shrinking = ort.RunOptions()
        self._shrinking.log_severity_level = 4
        self._shrinking.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._shrink_next = False
        self._rss_cap = 0
        last: Exception | None = None
        for start in range(len(chain)):
            tried = chain[start:]
            try:
                self.session = ort.InferenceSession(
                    str(model_path), sess_options=opts,
                    providers=[(p, _provider_options(p, manifest, cache)) for p in tried])
                break
            except Exception as e:  # noqa: BLE001 - EP init failures have many types; try the next EP
                last = e
                log.warning("onnxruntime session for %s/%s with %s failed (%s); trying %s",
                            self.name, self.version, tried, e, chain[start + 1:] or "nothing")
        if self.session is None:
            raise E.ModelError(f"cannot load {model_path} with onnxruntime: {last}") from last
        self._rss_cap = rss_bytes() + SHRINK_ABOVE_BYTES
        self.providers = list(self.session.get_providers())
        self._text_inputs = tokens.text_inputs_of(manifest) if self.accepts_text else ()
        signature.check_graph(manifest, signature.ort_specs(self.session.get_inputs()),
                              signature.ort_specs(self.session.get_outputs()), model_path.name, self._text_inputs)
        if self.accepts_text:
            self._encoder = tokens.text_encoder(manifest, tokenizer_path)
        log.info("loaded %s/%s (onnx, %s) on %s", self.name, self.version, manifest.precision, self.providers)

    def _run(self, feed: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        options = self._shrinking if self._shrink_next else self._run_options
        try:
            outs = self.session.run(self._output_names, feed, options)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises Fail/InvalidArgument/RuntimeException
            # INVALID_ARGUMENT is onnxruntime's verdict on these inputs (it is the same on
            # every try); FAIL and the rest may be the machine (memory, a device).
            cls = E.ModelInputError if type(e).__name__ == "InvalidArgument" else E.ModelError
            raise cls(f"{self.name}/{self.version}: onnxruntime run failed: {e}") from e
        finally:
            self._shrink_next = rss_bytes() > self._rss_cap
        return dict(zip(self._output_names, outs, strict=True))

    def interrupt(self) -> bool:
        """Set onnxruntime's terminate flag: the run in progress (a ``Loop`` whose trip count
        a request chose, say) returns an error at its next node, and so does every run until
        :meth:`resume`, such as the other length buckets of the same call."""
        self._run_options.terminate = self._shrinking.terminate = True
        return True

    def resume(self) -> None:
        self._run_options.terminate = self._shrinking.terminate = False

    def close(self) -> None:
        self.session = None

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(backend="onnxruntime", format=self.manifest.format, precision=self.manifest.precision,
                 providers=self.providers)
        return d
