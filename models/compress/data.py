"""The user's data for compressing a model: calibration samples and held-out samples.

Two file kinds are read:

* ``.npz``: one array per graph input, keyed by input name. Every input carries the samples
  on one axis, found from the graph's declared shape (the first dynamic axis whose length is
  the sample count): axis 0 for most models, axis 1 for a recurrent state laid out
  ``[layers, batch, hidden]`` (silero-vad's ``state``). An input whose array has no such axis
  (a scalar such as a sample rate) is the same for every sample and fed as is. An optional
  ``labels`` array (``[n]`` integers) adds accuracy to a classifier's report.
* a text file (any other suffix): one sample per line, for models that take text
  (``preprocess: bert_tokenizer``); blank lines are skipped.

Held-out data is never used for calibration or search; without a held-out file,
:func:`split` cuts a seeded share off the calibration data and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headrace.client.errors import ConfigError

Feed = dict[str, np.ndarray[Any, Any]]
TextEncoder = Callable[[Sequence[str]], Feed]
# input name -> declared dims (None = dynamic), from the graph
Declared = Mapping[str, Sequence[int | None]]
LABELS_KEY = "labels"
MIN_SAMPLES = 4


@dataclass(frozen=True)
class Samples:
    """``n`` samples of a model's inputs (tensors or texts), with optional labels.

    Attributes:
        arrays: input name -> array holding every sample on ``batch_axes[name]``.
        batch_axes: input name -> the sample axis, or None for an input shared by all samples.
        n: the number of samples.
        labels: ``[n]`` class labels, or None.
        texts: the samples as text (text models; ``arrays`` is then empty).
        origin: where they came from (file name, split), for the report.
    """

    arrays: Mapping[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    batch_axes: Mapping[str, int | None] = field(default_factory=dict)
    n: int = 0
    labels: np.ndarray[Any, Any] | None = None
    texts: tuple[str, ...] | None = None
    origin: str = ""

    def subset(self, idx: Sequence[int] | np.ndarray[Any, Any], origin: str = "") -> Samples:
        """The samples at ``idx`` (in that order)."""
        ix = np.asarray(idx, dtype=np.int64)
        arrays = {k: (v if self.batch_axes[k] is None else np.take(v, ix, axis=self.batch_axes[k]))
                  for k, v in self.arrays.items()}
        texts = tuple(self.texts[i] for i in ix) if self.texts is not None else None
        labels = self.labels[ix] if self.labels is not None else None
        return Samples(arrays, dict(self.batch_axes), int(len(ix)), labels, texts, origin or self.origin)

    def feeds(self, batch_size: int, encode: TextEncoder | None = None) -> list[Feed]:
        """Consecutive batches of at most ``batch_size`` samples as graph feeds.

        Raises:
            ConfigError: text samples without an ``encode`` function.
        """
        out: list[Feed] = []
        for start in range(0, self.n, batch_size):
            idx = np.arange(start, min(start + batch_size, self.n))
            if self.texts is not None:
                if encode is None:
                    raise ConfigError("text samples need the model's tokenizer (preprocess: bert_tokenizer)")
                out.append(encode([self.texts[i] for i in idx]))
            else:
                part = self.subset(idx)
                out.append({k: np.ascontiguousarray(v) for k, v in part.arrays.items()})
        return out

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "origin": self.origin, "kind": "text" if self.texts is not None else "tensors",
                "labels": self.labels is not None,
                "batch_axes": {k: v for k, v in self.batch_axes.items()}}


def _sample_axis(name: str, arr: np.ndarray[Any, Any], dims: Sequence[int | None], n: int | None) -> int | None:
    if arr.ndim == 0 or len(dims) == 0:
        return None
    if arr.ndim != len(dims):
        raise ConfigError(f"input {name!r}: the data has {arr.ndim} axes {arr.shape}, the graph declares "
                          f"{len(dims)} ({['?' if d is None else d for d in dims]})")
    for axis, (d, size) in enumerate(zip(dims, arr.shape, strict=True)):
        if d is not None and d != size:
            raise ConfigError(f"input {name!r}: axis {axis} has {size} entries, the graph wants {d}")
    dynamic = [axis for axis, d in enumerate(dims) if d is None]
    for axis in dynamic:
        if n is None or arr.shape[axis] == n:
            return axis
    if dynamic:
        raise ConfigError(f"input {name!r} holds {arr.shape[dynamic[0]]} samples on its dynamic axis "
                          f"{dynamic[0]}, the first input holds {n}")
    return None


def load_npz(path: str | Path, declared: Declared, dtypes: Mapping[str, np.dtype[Any]] | None = None) -> Samples:
    """Tensor samples from an ``.npz`` keyed by input name (see the module docstring).

    Raises:
        ConfigError: unreadable file, a missing or unknown input, inconsistent sample counts,
            shapes the graph does not accept, an array of another dtype than its input's in
            ``dtypes`` (:func:`check_dtypes`), NaN/Inf in a float input, or fewer than 4 samples.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {p} as an .npz of arrays (no pickles): {e}") from e
    labels = arrays.pop(LABELS_KEY, None)
    missing = [k for k in declared if k not in arrays]
    unknown = [k for k in arrays if k not in declared]
    if missing or unknown:
        raise ConfigError(f"{p.name}: the model's inputs are {list(declared)}; missing {missing}, unknown {unknown}"
                          f" (labels go under {LABELS_KEY!r})")
    axes: dict[str, int | None] = {}
    n: int | None = None
    for name, dims in declared.items():  # the first input with a dynamic axis fixes n
        axes[name] = _sample_axis(name, arrays[name], dims, n)
        if n is None and axes[name] is not None:
            n = int(arrays[name].shape[axes[name]])  # type: ignore[index]
    if n is None:
        raise ConfigError(f"{p.name}: no input has a sample axis (the graph declares no dynamic dimension)")
    for name, axis in axes.items():
        if axis is not None and arrays[name].shape[axis] != n:
            raise ConfigError(f"{p.name}: input {name!r} holds {arrays[name].shape[axis]} samples, "
                              f"{next(iter(declared))!r} holds {n}")
    _check_labels(labels, n, p.name)
    check_dtypes(arrays, dtypes or {}, p.name)
    for name, a in arrays.items():
        # Workers refuse NaN/Inf requests, so calibrating or judging on them measures
        # nothing served (all-NaN outputs even "agree" on every argmax).
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = np.argwhere(~np.isfinite(a))[0].tolist()
            raise ConfigError(f"{p.name}: input {name!r} holds NaN or Inf (first at index {bad}); drop or fix those "
                              "samples: workers refuse them, so they say nothing about the served model")
    if n < MIN_SAMPLES:
        raise ConfigError(f"{p.name}: {n} samples; give at least {MIN_SAMPLES}")
    return Samples(arrays, axes, n, None if labels is None else labels.reshape(-1), None, p.name)


def check_dtypes(arrays: Mapping[str, np.ndarray[Any, Any]], dtypes: Mapping[str, np.dtype[Any]],
                 where: str) -> None:
    """Every array must have its graph input's dtype (a string input takes any text array).
    Nothing is cast: float64 -> float32 loses digits, int64 -> int32 can wrap, and a float
    file for a token-id input is more likely the wrong file than a choice; the user converts.

    Raises:
        ConfigError: naming the file, the input, the dtype found and the dtype wanted.
    """
    for name, want in dtypes.items():
        if name not in arrays:
            continue
        have = arrays[name].dtype
        if have == want or (want.kind == "O" and have.kind in "USO"):
            continue
        wanted = "string" if want.kind == "O" else want.name
        fix = "" if want.kind == "O" else f" (e.g. np.savez(..., {name}=arr.astype(np.{wanted})))"
        raise ConfigError(f"{where}: input {name!r} is {have.name}, the model takes {wanted}; save it as "
                          f"{wanted}{fix}: nothing is cast for you")


def _check_labels(labels: np.ndarray[Any, Any] | None, n: int, where: str) -> None:
    if labels is not None and (labels.dtype.kind not in "iu" or labels.reshape(-1).shape != (n,)):
        raise ConfigError(f"{where}: {LABELS_KEY!r} must be {n} integer class labels, got {labels.dtype} "
                          f"{labels.shape}")


def load_text(path: str | Path) -> Samples:
    """Text samples, one per non-blank line (UTF-8).

    Raises:
        ConfigError: unreadable file or fewer than 4 lines.
    """
    p = Path(path)
    try:
        # "\n" only: str.splitlines also cuts at U+2028, form feeds and other separators
        # a sentence may hold; a line is a sample, as `headrace submit --texts` reads it.
        # utf-8-sig: a byte-order mark some editors write is no part of the first text
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").split("\n")]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {p} as UTF-8 text (one sample per line): {e}") from e
    texts = tuple(ln for ln in lines if ln)
    if len(texts) < MIN_SAMPLES:
        raise ConfigError(f"{p.name}: {len(texts)} non-blank line{'' if len(texts) == 1 else 's'}; give at least "
                          f"{MIN_SAMPLES}")
    return Samples(n=len(texts), texts=texts, origin=p.name)


def from_texts(texts: Sequence[str], origin: str) -> Samples:
    """Text samples from a list (recipes with built-in corpora)."""
    return Samples(n=len(texts), texts=tuple(texts), origin=origin)


def from_arrays(arrays: Mapping[str, np.ndarray[Any, Any]], origin: str,
                labels: np.ndarray[Any, Any] | None = None) -> Samples:
    """Tensor samples with every input batched on axis 0 (recipes with built-in data)."""
    n = len(next(iter(arrays.values())))
    _check_labels(labels, n, origin)
    return Samples(dict(arrays), dict.fromkeys(arrays, 0), n, labels, None, origin)


def load(path: str | Path, declared: Declared, *, text: bool,
         dtypes: Mapping[str, np.dtype[Any]] | None = None) -> Samples:
    """:func:`load_npz` for ``.npz`` files, :func:`load_text` for text models.

    Raises:
        ConfigError: a missing file, a text file for a tensor model or the other way round, or
            (from :func:`load_npz`) data the graph does not take.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {p} does not exist")
    if p.suffix == ".npz":
        if text:
            raise ConfigError(f"{p.name}: this model takes text; give a text file, one sample per line")
        return load_npz(p, declared, dtypes)
    if not text:
        raise ConfigError(f"{p.name}: this model takes tensors; give an .npz keyed by input name "
                          f"({list(declared)})")
    return load_text(p)


def split(samples: Samples, held_out_fraction: float, seed: int) -> tuple[Samples, Samples]:
    """A seeded (calibration, held-out) split; the held-out part is never calibrated on.

    Raises:
        ConfigError: a fraction outside (0, 1) or too few samples for two non-trivial parts.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"held-out fraction {held_out_fraction} must be in (0, 1), e.g. 0.2")
    n_held = int(round(samples.n * held_out_fraction))
    if n_held < 2 or samples.n - n_held < 2:
        raise ConfigError(f"{samples.n} samples cannot be split into calibration and held-out parts; "
                          f"give more data or a separate --held-out file")
    perm = np.random.default_rng(seed).permutation(samples.n)
    held, cal = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    name = samples.origin
    return (samples.subset(cal, f"{name} (calibration part, {samples.n - n_held} of {samples.n})"),
            samples.subset(held, f"{name} (held-out split: {n_held} of {samples.n}, seed {seed}; "
                                 f"no separate held-out file given)"))
