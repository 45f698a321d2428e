"""The limits a served text model cannot beat on this host, measured in the run that uses them.

* :func:`tokenizer_limit`: samples/s the MiniLM tokenizer reaches on the real texts with
  the threads a worker may use: ``encode_batch_fast`` (no character offsets; what a
  worker's ``TextEncoder`` calls, where the library has it, else ``encode_batch``) on whole
  model batches (rayon-parallel, ``RAYON_NUM_THREADS`` = ``threads``) is the limit
  (``limit_sps``), and, for comparison, ``encode_batch`` (with offsets) and ``encode`` one
  text at a time. It runs in a
  child process because rayon sizes its pool once per process, from the environment.
* the curve's own limit: :func:`benchmarks.lib.standin.curve_limit`.

    python -m benchmarks.lib.limits --tokenizer THREADS BATCH SECONDS POOL SEED   # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any


def _measure_tokenizer(batch: int, seconds: float, pool: int, seed: int) -> dict[str, float]:
    from headrace.cluster.bench.targets import text_payloads
    from headrace.models.tokenizer import load_tokenizer

    texts = list(text_payloads(pool, seed=seed).texts)
    tok = load_tokenizer()
    tok.no_padding()

    def rate(step: Any) -> tuple[float, float]:
        step(0)  # warm-up: the rayon pool starts on the first batch
        c0, t0 = time.process_time(), time.perf_counter()
        done = i = 0
        while time.perf_counter() - t0 < seconds:
            done += step(i)
            i += 1
        wall = time.perf_counter() - t0
        return done / wall, (time.process_time() - c0) * 1e6 / max(1, done)

    def batched(i: int) -> int:
        start = (i * batch) % len(texts)
        chunk = (texts * 2)[start:start + batch]
        tok.encode_batch(chunk)
        return len(chunk)

    def fast(i: int) -> int:
        start = (i * batch) % len(texts)
        chunk = (texts * 2)[start:start + batch]
        tok.encode_batch_fast(chunk)  # no offsets: less work per token (tokenizers >= 0.21)
        return len(chunk)

    def single(i: int) -> int:
        for k in range(batch):
            tok.encode(texts[(i * batch + k) % len(texts)])
        return batch

    b_sps, b_cpu = rate(batched)
    s_sps, s_cpu = rate(single)
    out = {"encode_batch_sps": b_sps, "encode_batch_cpu_us": b_cpu, "encode_one_sps": s_sps,
           "encode_one_cpu_us": s_cpu}
    out["limit_method"], out["limit_sps"], out["limit_cpu_us"] = "encode_batch", b_sps, b_cpu
    if hasattr(tok, "encode_batch_fast"):
        out["encode_batch_fast_sps"], out["encode_batch_fast_cpu_us"] = rate(fast)
        # What a worker's TextEncoder calls where the library has it: the limit it faces.
        out["limit_method"], out["limit_sps"] = "encode_batch_fast", out["encode_batch_fast_sps"]
        out["limit_cpu_us"] = out["encode_batch_fast_cpu_us"]
    return out


def tokenizer_limit(threads: int, batch: int, seconds: float = 3.0, pool: int = 512, seed: int = 0
                    ) -> dict[str, float]:
    """Tokenizer samples/s on ``pool`` real sentences (see module doc): ``{"threads",
    "batch", "encode_batch_sps", "encode_batch_cpu_us", "encode_one_sps",
    "encode_one_cpu_us"}`` and, where available, ``encode_batch_fast_sps`` /
    ``encode_batch_fast_cpu_us`` (cpu_us: CPU microseconds per sample, all threads).

    Raises:
        subprocess.CalledProcessError: the child failed.
    """
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.lib.limits", "--tokenizer", str(threads), str(batch),
                          str(seconds), str(pool), str(seed)], env=env, capture_output=True, text=True,
                         check=True, timeout=4 * seconds + 120)
    return {"threads": float(threads), "batch": float(batch), **json.loads(out.stdout)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", nargs=5, required=True, metavar=("THREADS", "BATCH", "SECONDS", "POOL", "SEED"))
    args = ap.parse_args(argv)
    _threads, batch, seconds, pool, seed = args.tokenizer
    print(json.dumps(_measure_tokenizer(int(batch), float(seconds), int(pool), int(seed))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
