"""The non-finite check takes a Python path for small arrays and numpy's for large ones;
both must answer exactly as ``np.isfinite(arr).all()`` for every float dtype, layout, size
around the switch-over, and position of a NaN or an infinity."""

from __future__ import annotations

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import Envelope, Request
from headrace.workers.backends.validate import SMALL_FINITE_CHECK, all_finite, check_finite

SIZES = (1, 2, SMALL_FINITE_CHECK - 1, SMALL_FINITE_CHECK, SMALL_FINITE_CHECK + 1, 200)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4", "<f8"])
@pytest.mark.parametrize("size", SIZES)
def test_agrees_with_numpy_for_every_bad_value_and_position(dtype: str, size: int) -> None:
    rng = np.random.default_rng(size)
    base = rng.standard_normal(size).astype(dtype)
    assert all_finite(base) is True
    for bad in (np.nan, np.inf, -np.inf):
        for at in {0, size // 2, size - 1}:
            arr = base.copy()
            arr[at] = bad
            assert all_finite(arr) is False and bool(np.isfinite(arr).all()) is False, (bad, at)


@pytest.mark.parametrize("size", SIZES)
def test_views_shapes_and_extremes(size: int) -> None:
    big = np.full((size, 3), np.finfo(np.float32).max, np.float32)  # finite, though a sum would overflow
    assert all_finite(big) and all_finite(big.T) and all_finite(big[:, 1]) and all_finite(big[::2])
    big[-1, 2] = np.nan
    assert not all_finite(big) and not all_finite(big.T) and not all_finite(big[:, 2])
    assert all_finite(big[:, :2])  # a view that leaves the NaN out
    assert all_finite(np.array(1.5, np.float32)) and not all_finite(np.array(np.inf, np.float64))


def test_check_finite_names_the_input_on_both_paths() -> None:
    for n in (4, 400):
        x = np.ones(n, np.float32)
        x[-1] = np.nan
        req = Request(Envelope("r1", "headrace:{m}:reply:c"), inputs={"x": x})
        with pytest.raises(E.InvalidTensorError, match="'x'") as info:
            check_finite(req)
        assert info.value.code == E.BAD_VALUE
