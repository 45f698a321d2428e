"""What the worker's non-finite check costs per input: numpy's ``isfinite(arr).all()`` (the
way it was for every size) against ``workers.backends.validate.all_finite`` (Python's
``math.isfinite`` over the values up to ``SMALL_FINITE_CHECK``, numpy's above), side by
side in one run, for float32 inputs of the sizes requests carry. The check runs twice per
request of a tensor model that rejects non-finite values (the worker's own, and the
servable's ``check_tensors``).

Prints microseconds per check (best of ``--repeat`` timings of ``--number`` checks each)
and the ratio. Asserts only that both ways agree.

    .venv/bin/python -m benchmarks.finite_check [--number 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from headrace.workers.backends.validate import SMALL_FINITE_CHECK, all_finite

SHAPES: tuple[tuple[int, ...], ...] = ((4,), (16,), (SMALL_FINITE_CHECK,), (SMALL_FINITE_CHECK + 1,), (384,),
                                       (64, 384))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--number", type=int, default=20000, help="checks per timing")
    ap.add_argument("--repeat", type=int, default=5, help="timings per way (the best is kept)")
    args = ap.parse_args()
    print(f"{'float32 input':<16} {'numpy us':>9} {'now us':>8} {'numpy / now':>12}")
    for shape in SHAPES:
        arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        assert all_finite(arr) == bool(np.isfinite(arr).all())
        n = max(100, args.number // max(1, arr.size // 64))
        old = min(timeit.repeat(lambda a=arr: bool(np.isfinite(a).all()), number=n, repeat=args.repeat)) / n * 1e6
        new = min(timeit.repeat(lambda a=arr: all_finite(a), number=n, repeat=args.repeat)) / n * 1e6
        print(f"{'x'.join(map(str, shape)):<16} {old:>9.2f} {new:>8.2f} {old / new:>11.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
