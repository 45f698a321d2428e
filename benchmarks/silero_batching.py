"""silero-vad's ONNX model served batched with per-input batch axes vs served unbatched.

Both variants are added with the ``models add`` code path (``add_model``) from the same
``silero_vad.onnx`` file and run through the worker's own servable (stacking, splitting,
checks) on the same chunks, with the same intra-op threads, one worker batch of
``--batch`` requests at a time:

* batched: ``state`` stacked on its axis 1, ``sr`` shared -> one model call per batch;
* unbatched: every request carries the model's own tensors (``[1,576]``, ``[2,1,128]``) ->
  one model call per request.

Prints measured chunks/s of each and their ratio; asserts nothing about speed.

    .venv/bin/python -m benchmarks.silero_batching --batch 32 --seconds 5 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from headrace.client.protocol import Envelope, Request
from headrace.cluster.ops.add_model import add_model
from headrace.models.importers import ImportOptions, parse_io
from headrace.models.repository.store import ModelRepository
from headrace.workers.backends import servable_from_manifest

BATCHED = ("input:float32:-1", "state:float32:2,B,128", "sr:int64::nobatch")
BATCHED_OUT = ("output:float32:1", "stateN:float32:2,B,128")
UNBATCHED = ("input:float32:1,-1:nobatch", "state:float32:2,1,128:nobatch", "sr:int64::nobatch")
UNBATCHED_OUT = ("output:float32:1,1:nobatch", "stateN:float32:2,1,128:nobatch")


def silero_onnx() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"


def add(repo: Path, name: str, ins: tuple[str, ...], outs: tuple[str, ...], batched: bool) -> Any:
    example = ({"input": np.zeros((2, 576), np.float32), "state": np.zeros((2, 2, 128), np.float32)} if batched
               else {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32)})
    example["sr"] = np.array(16000, np.int64)
    opts = ImportOptions(inputs={s.name: s for s in map(parse_io, ins)},
                         outputs={s.name: s for s in map(parse_io, outs)}, example=example)
    return add_model(repo, name, silero_onnx(), opts).manifest


def requests(n: int, batched: bool) -> list[Request]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = (rng.standard_normal(576) * 0.1).astype(np.float32)
        state = np.zeros((2, 128), np.float32)
        inputs = ({"input": x, "state": state} if batched else {"input": x[None], "state": state[:, None]})
        inputs["sr"] = np.array(16000, np.int64)
        out.append(Request(Envelope(f"r{i}", "reply"), inputs=inputs))
    return out


def measure(servable: Any, reqs: list[Request], batch: int, seconds: float) -> float:
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for start in range(0, len(reqs), batch):
            servable.infer(reqs[start:start + batch])
            done += len(reqs[start:start + batch])
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="requests per worker batch")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per variant")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = p.parse_args()
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = ModelRepository(tmp)
        for name, ins, outs, batched in (("vad-batched", BATCHED, BATCHED_OUT, True),
                                         ("vad-unbatched", UNBATCHED, UNBATCHED_OUT, False)):
            m = add(repo.root, name, ins, outs, batched)
            servable = servable_from_manifest(repo, m, intra_op_threads=args.threads)
            reqs = requests(args.batch * 8, batched)
            measure(servable, reqs[:args.batch], args.batch, 0.5)  # warm-up
            rates[name] = measure(servable, reqs, args.batch, args.seconds)
            servable.close()
    t = Table(title=f"silero-vad ONNX, worker batches of {args.batch}, {args.threads} intra-op thread(s)")
    for col in ("variant", "model calls per batch", "chunks/s"):
        t.add_column(col)
    t.add_row("batched (state batch axis 1, sr shared)", "1", f"{rates['vad-batched']:.0f}")
    t.add_row("unbatched (one request per call)", str(args.batch), f"{rates['vad-unbatched']:.0f}")
    Console().print(t)
    Console().print(f"batched / unbatched: {rates['vad-batched'] / rates['vad-unbatched']:.2f}x")


if __name__ == "__main__":
    main()
