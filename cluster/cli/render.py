"""Input loading and rich rendering for the ``headrace`` CLI (numpy, json and rich only)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.markup import escape
from rich.table import Table

from headrace.client import errors as E
from headrace.client.protocol import Result, numpy_dtype
from headrace.client.wire import all_str, dtype_name


def load_inputs(specs: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    """Named input arrays from ``--input`` values.

    Each spec is ``PATH`` or ``NAME=PATH``:

    * ``.npy``: one array, named NAME or the file's stem (``x.npy`` -> ``x``);
    * ``.npz``: every array in it under its own name;
    * ``.json``: a map ``{name: [numbers...]}`` (float32) or
      ``{name: {"dtype": "int64", "data": [...], "shape": [...]}}`` (``"string"``: a list of strings);
      bare strings or nested lists of strings are a string tensor.

    Raises:
        ProtocolError: unreadable file, unknown suffix, malformed JSON, or ``NAME=`` before a
            ``.npz``/``.json`` file, whose arrays are named in the file (``bad_value``).
    """
    out: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        name, sep, raw_path = spec.partition("=")
        if not sep:
            name, raw_path = "", spec
        path = Path(raw_path)
        suffix = path.suffix.lower()
        if name and suffix in (".npz", ".json"):
            raise E.ProtocolError(f"--input {spec}: NAME= names the array of a .npy; a {suffix} file carries the "
                                  f"names of its arrays itself", code=E.BAD_VALUE)
        try:
            if suffix == ".npy":
                out[name or path.stem] = np.load(path, allow_pickle=False)
            elif suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    for key in npz.files:
                        out[key] = npz[key]
            elif suffix == ".json":
                out.update(_json_inputs(json.loads(path.read_text(encoding="utf-8")), path))
            else:
                raise E.ProtocolError(f"{path}: use a .npy, .npz or .json file", code=E.BAD_VALUE)
        except (OSError, ValueError, TypeError) as e:  # TypeError: a dtype numpy does not know
            raise E.ProtocolError(f"cannot read input {path}: {e}", code=E.BAD_VALUE) from e
    return out


def _json_inputs(doc: Any, path: Path) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(doc, dict) or not doc:
        raise E.ProtocolError(f"{path}: expected a JSON object {{name: values}}", code=E.BAD_VALUE)
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, value in doc.items():
        if isinstance(value, dict):
            arr = np.asarray(value.get("data"), dtype=numpy_dtype(str(value.get("dtype", "float32"))))
            if "shape" in value:
                arr = arr.reshape(value["shape"])
        else:
            arr = _plain_values(value)
        out[str(name)] = arr
    return out


def _plain_values(value: Any) -> np.ndarray[Any, Any]:
    """A bare JSON value or nested list: all strings make a string tensor, else float32."""
    leaves = _flatten(value)
    if leaves and all(isinstance(v, str) for v in leaves):
        arr = np.array(value, dtype=object)  # object, not numpy str: that drops trailing NULs
        if arr.size != len(leaves) or not all_str(arr):
            raise ValueError("nested lists of strings must be rectangular")
        return arr
    return np.asarray(value, dtype=np.float32)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _preview(arr: np.ndarray[Any, Any], n: int = 6) -> str:
    flat = arr.reshape(-1)
    vals = ", ".join(f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in flat[:n].tolist())
    return f"[{vals}{', …' if flat.size > n else ''}]"


def result_table(result: Result) -> Table:
    """Outputs (dtype, shape, first values, L2 norm) and timings of one result."""
    # escape(): codes and messages contain "[...]", which rich would take for markup.
    table = Table(title=escape(f"request {result.request_id}: {result.status}"
                               + (f" [{result.code}] {result.message}" if not result.ok else "")))
    for col in ("output", "dtype", "shape", "values", "L2 norm"):
        table.add_column(col)
    for name, arr in result.outputs.items():
        norm = float(np.linalg.norm(arr.astype(np.float64))) if arr.dtype.kind in "fiu" else float("nan")
        table.add_row(name, dtype_name(arr.dtype), str(list(arr.shape)), escape(_preview(arr)), f"{norm:.4g}")
    t = result.timings
    table.caption = (f"model {result.model or '?'} v{result.version or '?'} · queue {t.queue_ms:.2f} ms · "
                     f"infer {t.infer_ms:.2f} ms · batch {t.batch_size} · worker {t.worker or '?'}")
    return table


def result_json(result: Result) -> dict[str, Any]:
    """A JSON-able dict of one result (outputs as nested lists)."""
    return {"request_id": result.request_id, "status": result.status, "code": result.code,
            "message": result.message, "model": result.model, "version": result.version,
            "outputs": {k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape), "data": v.tolist()}
                        for k, v in result.outputs.items()},
            "timings": result.timings.to_wire()}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN: no data in the window
            return "-"
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def status_table(statuses: Iterable[tuple[str, Any]], namespace: str) -> Table:
    """One row per model from ``(model, ModelStatus)`` pairs (``model_status`` results)."""
    # A light box keeps ten columns inside an 80-column terminal.
    table = Table(title=f"headrace status · namespace {namespace}", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)
    table.add_column("model", no_wrap=True)
    for col in ("stream", "lag", "pending", "consumers", "workers", "DLQ", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for model, st in statuses:
        consumers = _get(st, "consumers", []) or []
        workers = _get(st, "workers", None)
        if isinstance(workers, (list, tuple, dict)):
            workers = len(workers)
        lag = _fmt(_get(st, "lag"))
        per_entry = _get(st, "samples_per_entry", 1.0)
        if isinstance(per_entry, (int, float)) and per_entry > 1.0:
            lag = f"{lag} ×{per_entry:.0f}"  # multi-sample entries: entries x samples each
        table.add_row(model, _fmt(_get(st, "stream_length")), lag, _fmt(_get(st, "pending")),
                      str(len(consumers)), _fmt(workers), _fmt(_get(st, "dead_letters")),
                      _fmt(_get(st, "throughput_rps")), _fmt(_get(st, "p50_ms")), _fmt(_get(st, "p99_ms")))
    if table.row_count == 0:
        table.caption = "no models: start a worker (headrace worker --model NAME) or submit a request"
    return table


def dlq_table(letters: Iterable[Any], model: str) -> Table:
    """Dead letters (``DeadLetter`` records) as a table, oldest first."""
    import datetime as dt

    table = Table(title=f"dead letters of {model}")
    for col in ("dlq id", "request id", "code", "reason", "deliveries", "dead-lettered at (UTC)"):
        table.add_column(col, overflow="fold")
    for d in letters:
        ts = _get(d, "ts_ms", 0) or 0
        when = dt.datetime.fromtimestamp(ts / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"
        table.add_row(str(_get(d, "dlq_id", "")), escape(str(_get(d, "request_id", "")) or "-"),
                      str(_get(d, "code", "")), escape(str(_get(d, "reason", ""))[:200]),
                      str(_get(d, "deliveries", "")), when)
    if table.row_count == 0:
        table.caption = "(empty)"
    return table


def placement_table(moves: Sequence[Any], addresses: Sequence[str], model: str, done: bool) -> Table:
    """A partitioned model's partitions (``placement.Move`` records) on the cluster's
    masters: each one's slot, where it was, where it goes, and per master how many."""
    table = Table(title=f"partitions of {model} on {len(addresses)} masters")
    for col in ("partition", "slot", "master now", "placed on", ""):
        table.add_column(col)
    for mv in moves:
        verb = ("moved" if done else "moves") if mv.moves else "stays"
        now = addresses[mv.src] if mv.agreed else "[red]masters disagree[/red]"
        table.add_row(str(mv.partition), str(mv.slot), now, addresses[mv.dst], verb if mv.agreed else f"{verb} (repair)")
    before = [sum(1 for mv in moves if mv.src == i) for i in range(len(addresses))]
    after = [sum(1 for mv in moves if mv.dst == i) for i in range(len(addresses))]
    table.caption = (f"per master, before: {' / '.join(map(str, before))}; "
                     f"{'now' if done else 'after place'}: {' / '.join(map(str, after))}")
    return table
