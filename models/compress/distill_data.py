"""What a distillation learns from: the teacher's target embeddings and the batch order.

The fp32 teacher embeds the training sentences once (:func:`teacher_embeddings`); the result
is cached as safetensors in the run folder, keyed by a hash of the sentences and the
truncation (:func:`cached_teacher_embeddings`), so a resumed run does not recompute it.
The batches of each epoch are a pure function of the seed, the epoch and the sentences'
token lengths (:func:`epoch_batches`), which is what makes a resumed run end in the same
weights as an uninterrupted one. :mod:`headrace.models.compress.distill` trains on both.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from headrace.models.compress.distill import DistillConfig

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher_embeddings.safetensors"


# --- teacher targets ------------------------------------------------------------------------


def sentences_fingerprint(sentences: Sequence[str]) -> str:
    """A 16-hex-digit sha256 of the sentences in order (the teacher cache and checkpoints key on it)."""
    h = hashlib.sha256()
    for s in sentences:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [n, <= max_length] of ``texts`` as int64 tensors."""
    from headrace.models.tokenizer import encode_batch

    ids, mask = encode_batch(tokenizer, texts)
    ids, mask = ids[:, :max_length], mask[:, :max_length]
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.inference_mode()
def teacher_embeddings(teacher: torch.nn.Module, tokenizer: Any, sentences: Sequence[str], *,
                       max_length: int = 128, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """The teacher's embeddings [n, dim] of ``sentences``, in order. Batches are formed from
    length-sorted sentences so little time goes into padding."""
    from tqdm.auto import tqdm

    teacher.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(sentences)
    for start in tqdm(range(0, len(order), batch_size), desc="teacher embeddings", unit="batch",
                      disable=not progress):
        idx = order[start:start + batch_size]
        emb = teacher(*encode_texts(tokenizer, [sentences[i] for i in idx], max_length))
        for row, i in enumerate(idx):
            out[i] = emb[row]
    return torch.stack(out)


def cached_teacher_embeddings(run_dir: Path, teacher: torch.nn.Module, tokenizer: Any, sentences: Sequence[str],
                              *, max_length: int, progress: bool = True) -> torch.Tensor:
    """:func:`teacher_embeddings`, cached in ``run_dir`` as safetensors keyed by a hash of
    the sentences and ``max_length`` (a resumed run does not recompute them)."""
    from safetensors.torch import load_file, save_file

    key = f"{sentences_fingerprint(sentences)}-{max_length}"
    path = run_dir / TEACHER_FILE
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") == key:
                return load_file(str(path))["embeddings"]
        except Exception as e:  # noqa: BLE001 - a damaged cache is simply recomputed
            log.warning("teacher cache %s unreadable (%s); recomputing", path, e)
    emb = teacher_embeddings(teacher, tokenizer, sentences, max_length=max_length, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": emb.contiguous()}, str(path), metadata={"key": key})
    return emb


# --- data order -----------------------------------------------------------------------------


def token_lengths(tokenizer: Any, sentences: Sequence[str], max_length: int) -> np.ndarray[Any, Any]:
    """Tokens of each sentence (special tokens included), capped at ``max_length``."""
    encs = tokenizer.encode_batch(list(sentences))
    return np.minimum(np.asarray([int(sum(e.attention_mask)) for e in encs], dtype=np.int64), max_length)


BUCKET_BATCHES = 50  # batches per length-sorted chunk


def epoch_batches(epoch: int, lengths: np.ndarray[Any, Any], config: DistillConfig) -> list[np.ndarray[Any, Any]]:
    """The batches of one epoch, a pure function of ``(seed, epoch)`` and the lengths.

    Sentences are shuffled, cut into chunks of ``BUCKET_BATCHES`` batches, sorted by length
    inside each chunk (so a batch pads to about its members' own length -- corpus sentences
    are 18 tokens at the median but 60 at the 99th percentile), then the batches are shuffled.
    """
    rng = np.random.default_rng([config.seed, epoch])
    perm = rng.permutation(len(lengths))
    bs = config.batch_size
    chunk = bs * BUCKET_BATCHES
    batches: list[np.ndarray[Any, Any]] = []
    for c in range(0, len(perm), chunk):
        part = perm[c:c + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + bs] for i in range(0, len(part), bs))
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_per_epoch(n: int, config: DistillConfig) -> int:
    chunk = config.batch_size * BUCKET_BATCHES
    full, rest = divmod(n, chunk)
    return full * BUCKET_BATCHES + math.ceil(rest / config.batch_size)
