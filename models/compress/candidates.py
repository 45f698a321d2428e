"""Load every converted candidate in a child process before this process touches it.

A converter can write a file that passes ``onnx.checker`` yet crashes the runtime that loads
it: ORT's fp16 conversion of a torch ``nn.TransformerEncoderLayer`` graph segfaults
``ort.InferenceSession`` in the extended graph optimiser. Loaded in-process, such a file
kills the whole ``headrace compress`` run (no report, the other steps' artifacts lost);
published, it would kill every worker that loads it. So each candidate is first loaded, and
run once on a sample, in a fresh interpreter (one child per candidate, as
:mod:`.edge` does for onnx2tf); a child that dies by a signal makes the candidate refused
with that reason. Nothing is pickled: the child gets a JSON line of paths on its command
line, the sample as an ``.npz`` (read with ``allow_pickle=False``), and answers with one
JSON line on stdout.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ModelError
from headrace.models.compress.data import Feed, Samples, TextEncoder
from headrace.models.compress.steps import Candidate

# Loading a large graph with every optimisation on takes a while; a child that does not
# answer in this time is counted as unusable rather than waited on forever.
VET_TIMEOUT_S = 900

_CHILD = r"""
import json, sys
a = json.loads(sys.argv[1])
import numpy as np
stage = "loading"
try:
    if a["fmt"] == "tflite":
        from headrace.models.compress.edge import litert_run_all
        run = litert_run_all(a["path"], a["threads"], a["extra"])
    else:
        from headrace.models.compress.evaluate import ort_run_all
        run = ort_run_all(a["path"], a["threads"], a["outputs"])
    print(json.dumps({"loaded": True}), flush=True)
    stage = "running"
    with np.load(a["sample"], allow_pickle=False) as z:
        feed = {name: z[f"arr_{i}"] for i, name in enumerate(a["inputs"])}
    run(feed)
    print(json.dumps({"ok": True}), flush=True)
except Exception as e:
    print(json.dumps({"error": getattr(e, "message", None) or f"{type(e).__name__}: {e}", "stage": stage}),
          flush=True)
    sys.exit(3)
"""


def write_sample(feed: Feed, path: Path) -> Path:
    """Save one feed for the child: arrays by position (``arr_0``...) so no input name, whatever
    characters it holds, becomes a file name inside the archive; the names travel as JSON."""
    np.savez(path, *[np.ascontiguousarray(v) for v in feed.values()])
    return path


def vet(path: Path, fmt: str, sample: Path, input_names: Sequence[str], output_names: Sequence[str], *,
        threads: int = 1, extra: Mapping[str, Any] | None = None, timeout_s: float = VET_TIMEOUT_S) -> None:
    """Load ``path`` (``onnx`` or ``tflite``) in a child process and run it once on ``sample``.

    Raises:
        ModelError: the child crashed (a signal), timed out or failed to load or run the file;
            the message says which, e.g. "onnxruntime crashed loading it (signal 11 SIGSEGV)".
    """
    args = {"path": str(path), "fmt": fmt, "sample": str(sample), "inputs": list(input_names),
            "outputs": list(output_names), "threads": int(threads), "extra": dict(extra or {})}
    runtime = "LiteRT" if fmt == "tflite" else "onnxruntime"
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise ModelError(f"{runtime} did not load and run it in {timeout_s:g}s (checked in a child process)") from e
    said = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    loaded = any(d.get("loaded") for d in said)
    if proc.returncode < 0:
        sig = -proc.returncode
        name = ""
        with contextlib.suppress(ValueError):
            name = f" {signal.Signals(sig).name}"
        raise ModelError(f"{runtime} crashed {'running it on a sample' if loaded else 'loading it'} "
                         f"(signal {sig}{name}); a worker loading it would crash too")
    errors = [d for d in said if "error" in d]
    if errors:
        raise ModelError(f"{runtime} fails {errors[-1].get('stage', 'loading')} it (in a child process): "
                         f"{errors[-1]['error']}")
    if proc.returncode != 0 or not any(d.get("ok") for d in said):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["(no message)"]
        raise ModelError(f"{runtime} could not load and run it in a child process (exit {proc.returncode}): "
                         f"{tail[0][:300]}")


def refusal(c: Candidate, held: Samples, encode: TextEncoder | None, output_names: Sequence[str],
            threads: int) -> str:
    """Why ``c`` must be refused before it is loaded here ("" when its child loaded and ran it
    on the first held-out samples). Never raises: an unusable candidate is a verdict."""
    feed = held.subset(np.arange(min(2, held.n))).feeds(8, encode)[0]
    sample = write_sample(feed, c.path.parent / f".{c.path.stem}-vet-sample.npz")
    try:
        vet(c.path, c.fmt, sample, list(feed), output_names, threads=threads, extra=c.extra)
    except ModelError as e:
        return e.message
    finally:
        sample.unlink(missing_ok=True)
    return ""


def below(score: float, floor: float) -> str:
    """``score`` with enough digits (4 to 10) to read as less than ``floor``: 0.98996 under a
    0.99 gate prints as 0.98996, not as a 0.9900 that seems to pass."""
    for digits in range(4, 11):
        text = f"{score:.{digits}f}"
        if not score == score or float(text) < floor:
            return text
    return repr(score)
