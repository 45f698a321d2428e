"""The model artifacts the benchmarks compare: MiniLM fp32 (ONNX, BERT-fused) and its
INT8 dynamic per-channel quantization, both in the model repository.

The INT8 entry is made with the project's own quantizer
(:func:`headrace.models.compress.quantize.quantize_dynamic_int8`) from the fp32 entry and
cached like :mod:`headrace.models.builtin.build` caches builds: an entry whose ``build_key``
matches (same fp32 build, same quantizer options, same tool versions) is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headrace.models.repository.store import Manifest, ModelRepository

log = logging.getLogger(__name__)

INT8_NAME = "minilm-int8"
INT8_PARAMS: dict[str, Any] = {"weight_type": "int8", "per_channel": True, "tool": "onnxruntime.quantization"}


@contextlib.contextmanager
def _locked(repo: ModelRepository, name: str) -> Iterator[None]:
    # Two benchmark processes (or a benchmark and a test) must not quantize twice into two versions.
    with (repo.root / f".{name}.build.lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_minilm_fp32(repo: ModelRepository | str | Path) -> Manifest:
    """The fp32 ONNX MiniLM entry (built on first use; minutes on 2 cores).

    Raises:
        ModelNotFoundError / ModelError / RepositoryError: see :func:`headrace.models.builtin.build.build_minilm`.
    """
    from headrace.models.builtin.build import ensure_minilm

    return ensure_minilm(repo if isinstance(repo, ModelRepository) else ModelRepository(repo))


def ensure_minilm_int8(repo: ModelRepository | str | Path) -> Manifest:
    """The INT8 (dynamic, per-channel) MiniLM entry made from the fp32 one, cached.

    Raises:
        ModelError: quantization failed.
        RepositoryError: the repository refused the entry.
    """
    from headrace.models.builtin.build import build_key, find_build
    from headrace.models.builtin.minilm import default_model_path

    r = repo if isinstance(repo, ModelRepository) else ModelRepository(repo)
    fp32 = ensure_minilm_fp32(r)
    from headrace.models.compress.quantize import cpu_needs_reduce_range, quantize_dynamic_int8

    # The 7-bit choice follows the CPU (cpu_needs_reduce_range): it is part of what was built.
    params = {**INT8_PARAMS, "reduce_range": cpu_needs_reduce_range()}
    key = build_key("minilm-int8-dynamic", default_model_path(),
                    {"from": fp32.extra.get("build_key", fp32.version), **params})
    with _locked(r, INT8_NAME):
        cached = find_build(r, INT8_NAME, key)
        if cached is not None:
            return cached
        src = r.file_path(fp32, fp32.model_file)
        tok = r.file_path(fp32, str(fp32.extra.get("tokenizer", "tokenizer.json")))
        with tempfile.TemporaryDirectory(dir=r.root, prefix=".build-") as tmp:
            out = quantize_dynamic_int8(src, Path(tmp) / "model.onnx", per_channel=True,
                                        reduce_range=params["reduce_range"])
            m = r.add(INT8_NAME, {"model.onnx": out, "tokenizer.json": tok}, format="onnx", backend="onnxruntime",
                      precision="int8", inputs=fp32.inputs, outputs=fp32.outputs, preprocess=fp32.preprocess,
                      postprocess=fp32.postprocess, source=fp32.source,
                      recipe=[*fp32.recipe, {"step": "quantize-dynamic", "params": params}],
                      measured={"size_bytes": out.stat().st_size},
                      extra={**fp32.extra, "build_key": key, "from": f"{fp32.name}/{fp32.version}"},
                      description="all-MiniLM-L6-v2, INT8 dynamic per-channel ONNX (benchmark artifact)")
        log.info("quantized %s/%s -> %s/%s", fp32.name, fp32.version, m.name, m.version)
        return m


def ensure_benchmark_models(repo: ModelRepository | str | Path, which: tuple[str, ...] = ("int8", "fp32")
                            ) -> dict[str, Manifest]:
    """``{"int8": manifest, "fp32": manifest}`` (only the ones in ``which``), built if needed."""
    out: dict[str, Manifest] = {}
    for w in which:
        out[w] = ensure_minilm_int8(repo) if w == "int8" else ensure_minilm_fp32(repo)
    return out
