"""Shared request validation for servables: signature checks and non-finite rejection.

Servables call :func:`check_tensors` (tensor models) or :func:`check_text` (text models)
from their ``check`` method; the worker loop additionally calls :func:`check_finite` on every
request when ``WorkerSettings.reject_non_finite`` is set, so a NaN never reaches a backend
even through a servable that forgot to check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import Request
from headrace.client.wire import dtype_name
from headrace.workers.backends.base import TensorSpec


def _shape_matches(actual: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    return len(actual) == len(spec) and all(s == -1 or a == s for a, s in zip(actual, spec, strict=True))


# Up to this many values, Python's math.isfinite over a list is faster than numpy's
# isfinite + all (0.9 against 3.1 us for 4 float32 values on the 2-core VM): the per-call cost of
# two ufuncs outweighs the work for the single samples most requests carry
# (benchmarks/finite_check.py).
SMALL_FINITE_CHECK = 32


def all_finite(arr: np.ndarray[Any, Any]) -> bool:
    """Whether a float array holds no NaN and no +-Inf."""
    if arr.size <= SMALL_FINITE_CHECK:
        return all(map(math.isfinite, arr.ravel().tolist()))
    return bool(np.isfinite(arr).all())


def check_finite(request: Request) -> None:
    """Reject float inputs that hold NaN or +-Inf.

    Raises:
        InvalidTensorError: code ``bad_value``, naming the input.
    """
    for name, arr in request.inputs.items():
        if arr.dtype.kind == "f" and arr.size and not all_finite(arr):
            raise E.InvalidTensorError(
                f"input {name!r} of request {request.request_id} holds NaN or Inf; send finite values",
                code=E.BAD_VALUE)


def check_tensors(request: Request, specs: Sequence[TensorSpec], reject_non_finite: bool = True) -> None:
    """Check one request's named tensors against a per-sample signature.

    ``-1`` in a spec's shape accepts any size on that axis. Inputs not named by ``specs``
    are refused so a producer's typo surfaces instead of being silently ignored.

    Raises:
        MissingFieldError: the request lacks a named input (``missing_field``).
        InvalidTensorError: wrong dtype (``bad_dtype``), wrong shape (``bad_shape``), or a
            non-finite float when ``reject_non_finite`` (``bad_value``).
        ProtocolError: text instead of tensors, or an input name the model does not have
            (``bad_value``: valid v1, but not what this model takes).
    """
    if request.text is not None:
        raise E.ProtocolError(f"this model takes tensors {[s.name for s in specs]}, not text", code=E.BAD_VALUE)
    names = {s.name for s in specs}
    extra = sorted(set(request.inputs) - names)
    if extra:
        raise E.ProtocolError(f"unknown input(s) {extra}; this model takes {sorted(names)}", code=E.BAD_VALUE)
    for spec in specs:
        arr: np.ndarray[Any, Any] | None = request.inputs.get(spec.name)
        if arr is None:
            raise E.MissingFieldError(f"input {spec.name!r} is missing")
        if dtype_name(arr.dtype) != spec.dtype:
            raise E.InvalidTensorError(
                f"input {spec.name!r} has dtype {dtype_name(arr.dtype)}, expected {spec.dtype}", code=E.BAD_DTYPE)
        if not _shape_matches(tuple(arr.shape), tuple(spec.shape)):
            raise E.InvalidTensorError(
                f"input {spec.name!r} has shape {list(arr.shape)}, expected {list(spec.shape)} "
                f"(-1 = any; no batch dimension)", code=E.BAD_SHAPE)
    if reject_non_finite:
        check_finite(request)


def check_text(request: Request, max_chars: int | None = None) -> None:
    """Check that a request for a text model carries a (bounded) text.

    Raises:
        ProtocolError: tensors instead of a text (``bad_value``).
        PayloadTooLargeError: longer than ``max_chars`` (``payload_too_large``).
    """
    if request.text is None:
        raise E.ProtocolError("this model takes 'text', not tensors", code=E.BAD_VALUE)
    if max_chars is not None and len(request.text) > max_chars:
        raise E.PayloadTooLargeError(f"text of {len(request.text)} chars exceeds {max_chars}")
