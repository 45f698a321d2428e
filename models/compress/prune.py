"""Structured pruning: remove whole attention heads and FFN neurons (MiniLM) or hidden units
(digits MLP) by slicing the Linear layers, so the model is physically smaller and faster on
dense kernels -- not a mask over weights that stay the same size.

Importance is measured on sample data from each unit's contribution ``c`` to the residual
stream -- its variance around the mean over real (unpadded) tokens, ``E||c||^2 - ||E c||^2``
(:class:`UnitStats`); the mean part of every removed unit is folded into the output bias:

* head ``h`` of a layer: ``c = ctx_h @ W_out[:, h]^T``, what the head adds through the
  output projection;
* FFN neuron ``j``: ``c = gelu(a_j) * W_out[:, j]``;
* MLP hidden unit: the same for ``relu(a_j) * W_next[:, j]``.

(A loss gradient is no use here: a sentence encoder compared with itself sits at the optimum
of any similarity loss, so every first-order gradient is zero.) Units are ranked globally
across layers, so layers that matter less lose more, with a floor per layer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from headrace.client.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

TextBatch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), int64 [B, S]


@dataclass(frozen=True)
class PruneSpec:
    """How much to remove.

    Attributes:
        head_fraction: share of all attention heads to remove (global ranking).
        ffn_fraction: share of all FFN neurons to remove (global ranking).
        min_heads_per_layer / min_ffn_per_layer: floors, so no layer collapses entirely.
        ffn_multiple: round each layer's kept FFN width up to a multiple of this (dense
            kernels are fastest on aligned widths).
    """

    head_fraction: float = 0.25
    ffn_fraction: float = 0.4
    min_heads_per_layer: int = 2
    min_ffn_per_layer: int = 128
    ffn_multiple: int = 16

    def __post_init__(self) -> None:
        for name in ("head_fraction", "ffn_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"prune {name}={v} must be in [0, 1), e.g. 0.25")
        if self.min_heads_per_layer < 0 or self.min_ffn_per_layer < 0 or self.ffn_multiple < 1:
            raise ConfigError("prune floors must be >= 0 and ffn_multiple >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PruneReport:
    """What pruning did: parameter counts before/after and the per-layer shapes kept."""

    params_before: int
    params_after: int
    heads_before: tuple[int, ...]
    heads_after: tuple[int, ...]
    ffn_before: tuple[int, ...]
    ffn_after: tuple[int, ...]
    spec: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("heads_before", "heads_after", "ffn_before", "ffn_after"):
            d[k] = list(d[k])
        return d


# --- slicing --------------------------------------------------------------------------------


def _slice_linear(layer: nn.Linear, *, out_idx: torch.Tensor | None = None,
                  in_idx: torch.Tensor | None = None) -> nn.Linear:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _as_index(keep: Sequence[int], limit: int, what: str) -> torch.Tensor:
    idx = sorted({int(i) for i in keep})
    if any(i < 0 or i >= limit for i in idx):
        raise ConfigError(f"{what}: indices {idx} out of range 0..{limit - 1}")
    return torch.tensor(idx, dtype=torch.long)


def prune_heads(model: Any, keep: Sequence[Sequence[int]]) -> None:
    """Keep only heads ``keep[i]`` of layer ``i`` of a MiniLM (in place): slices q/k/v rows
    and the output projection's columns and sets ``num_heads``; updates ``model.config``.

    Raises:
        ConfigError: wrong number of layers or an index out of range.
    """
    layers = model.layers
    if len(keep) != len(layers):
        raise ConfigError(f"prune_heads needs one head list per layer ({len(layers)}), got {len(keep)}")
    for i, (layer, heads) in enumerate(zip(layers, keep, strict=True)):
        att = layer.attention
        d = int(att.head_dim)
        h_idx = _as_index(heads, int(att.num_heads), f"layer {i} heads")
        cols = (h_idx[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        att.q = _slice_linear(att.q, out_idx=cols)
        att.k = _slice_linear(att.k, out_idx=cols)
        att.v = _slice_linear(att.v, out_idx=cols)
        att.out = _slice_linear(att.out, in_idx=cols)
        att.num_heads = len(h_idx)
    model.config = model.current_config()


def prune_ffn(model: Any, keep: Sequence[Sequence[int]]) -> None:
    """Keep only FFN neurons ``keep[i]`` of layer ``i`` of a MiniLM (in place).

    Raises:
        ConfigError: wrong number of layers or an index out of range.
    """
    layers = model.layers
    if len(keep) != len(layers):
        raise ConfigError(f"prune_ffn needs one neuron list per layer ({len(layers)}), got {len(keep)}")
    for i, (layer, neurons) in enumerate(zip(layers, keep, strict=True)):
        ffn = layer.ffn
        idx = _as_index(neurons, int(ffn.inter.out_features), f"layer {i} ffn")
        ffn.inter = _slice_linear(ffn.inter, out_idx=idx)
        ffn.out = _slice_linear(ffn.out, in_idx=idx)
    model.config = model.current_config()


# --- importance -----------------------------------------------------------------------------


@dataclass
class UnitStats:
    """Running statistics of each unit's contribution to the residual stream of one layer.

    ``importance`` is the contribution's variance around its mean (``E||c||^2 - ||E c||^2``):
    the constant part ``E c`` of a removed unit is folded into the output bias
    (:func:`_fold_mean`), so only what varies with the input is lost by removing it.
    """

    sq_norm: torch.Tensor  # [U] sum over tokens of ||c_u||^2
    mean_vec: torch.Tensor  # [U, D] sum over tokens of c_u
    tokens: float = 0.0

    def add(self, contrib: torch.Tensor, mask: torch.Tensor) -> None:
        """``contrib`` [B, S, U, D] (or [B, S, U] scalars times a fixed direction handled by
        the caller), ``mask`` [B, S] of 0/1 real-token flags."""
        m = mask[..., None, None]
        self.sq_norm += (contrib.pow(2).sum(-1) * mask[..., None]).sum(dim=(0, 1))
        self.mean_vec += (contrib * m).sum(dim=(0, 1))
        self.tokens += float(mask.sum())

    @property
    def mean(self) -> torch.Tensor:
        return self.mean_vec / max(self.tokens, 1.0)

    @property
    def importance(self) -> torch.Tensor:
        return (self.sq_norm / max(self.tokens, 1.0) - self.mean.pow(2).sum(-1)).clamp(min=0.0)


@torch.no_grad()
def minilm_unit_stats(model: Any, batches: Sequence[TextBatch]) -> tuple[list[UnitStats], list[UnitStats]]:
    """Contribution statistics of every attention head and FFN neuron of every layer over
    the real (unpadded) tokens of ``batches``.

    Raises:
        ConfigError: no batches.
    """
    if not batches:
        raise ConfigError("pruning importance needs at least one batch of sample sentences")
    model.eval()
    dim = int(model.config.hidden_size)
    heads = [UnitStats(torch.zeros(int(ly.attention.num_heads)), torch.zeros(int(ly.attention.num_heads), dim))
             for ly in model.layers]
    ffn = [UnitStats(torch.zeros(int(ly.ffn.inter.out_features)), torch.zeros(int(ly.ffn.inter.out_features), dim))
           for ly in model.layers]
    state: dict[str, torch.Tensor] = {}

    def att_hook(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            att = model.layers[i].attention
            h, d = int(att.num_heads), int(att.head_dim)
            if h == 0:
                return
            ctx = args[0].reshape(*args[0].shape[:2], h, d)  # input of attention.out, per head
            w = att.out.weight.reshape(-1, h, d)  # [D, H, d]
            heads[i].add(torch.einsum("bshd,Dhd->bshD", ctx, w), state["mask"])
        return hook

    def ffn_hook(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            act = args[0]  # [B, S, F]: gelu output feeding ffn.out
            w = model.layers[i].ffn.out.weight  # [D, F]
            m = state["mask"]
            st = ffn[i]
            # c_j = act_j * w[:, j]: the [B, S, F, D] tensor would be large, so use
            # ||c_j||^2 = act_j^2 ||w_j||^2 and sum c_j = (sum act_j) w_j.
            col_sq = w.pow(2).sum(0)
            st.sq_norm += (act.pow(2) * m[..., None]).sum(dim=(0, 1)) * col_sq
            st.mean_vec += (act * m[..., None]).sum(dim=(0, 1))[:, None] * w.T
            st.tokens += float(m.sum())
        return hook

    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.attention.out.register_forward_pre_hook(att_hook(i)))
        hooks.append(layer.ffn.out.register_forward_pre_hook(ffn_hook(i)))
    try:
        for ids, mask in batches:
            state["mask"] = mask.to(torch.float32)
            model(ids, mask)
    finally:
        for hk in hooks:
            hk.remove()
    return heads, ffn


def _fold_mean(out: nn.Linear, stats: UnitStats, keep: Sequence[int]) -> None:
    """Add the mean contribution of the units not in ``keep`` to ``out.bias``, so removing
    them shifts the residual stream only by their input-dependent part."""
    removed = [u for u in range(stats.mean.shape[0]) if u not in set(keep)]
    if removed and out.bias is not None:
        with torch.no_grad():
            out.bias.add_(stats.mean[removed].sum(dim=0).to(out.bias.dtype))


def _global_keep(scores: Sequence[torch.Tensor], fraction: float, floor: int, multiple: int = 1) -> list[list[int]]:
    """Indices to keep per layer after removing the globally least important ``fraction``
    of units, keeping at least ``floor`` per layer, widths rounded up to ``multiple``."""
    sizes = [len(s) for s in scores]
    total = sum(sizes)
    n_remove = int(round(fraction * total))
    if n_remove == 0:
        return [list(range(n)) for n in sizes]
    flat = torch.cat([s.float() for s in scores])
    # Normalise per layer by the layer's mean so one loud layer does not dominate the ranking.
    layer_of = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    means = torch.stack([s.float().mean().clamp(min=1e-12) for s in scores])
    order = torch.argsort(flat / means[layer_of])  # least important first
    removed_per_layer = [0] * len(sizes)
    drop: list[set[int]] = [set() for _ in sizes]
    offsets = np.cumsum([0, *sizes])
    for g in order.tolist():
        if sum(removed_per_layer) >= n_remove:
            break
        li = int(layer_of[g])
        if sizes[li] - removed_per_layer[li] <= floor:
            continue
        drop[li].add(g - int(offsets[li]))
        removed_per_layer[li] += 1
    keep: list[list[int]] = []
    for li, n in enumerate(sizes):
        kept = [j for j in range(n) if j not in drop[li]]
        want = min(n, -(-len(kept) // multiple) * multiple)
        if want > len(kept):  # add back the most important of the dropped ones
            back = sorted(drop[li], key=lambda j: float(scores[li][j]), reverse=True)[: want - len(kept)]
            kept = sorted(kept + back)
        keep.append(kept)
    return keep


def prune_minilm(model: Any, batches: Sequence[TextBatch], spec: PruneSpec) -> tuple[Any, PruneReport]:
    """Structured pruning of a copy of ``model`` (the input is left unchanged).

    Args:
        batches: tokenised sample sentences (training split, not held-out).
        spec: fractions and floors.

    Returns:
        (pruned MiniLM in eval mode with an updated ``config``, report).

    Raises:
        ConfigError: no batches. ModelError: the pruned model does not run.
    """
    pruned = copy.deepcopy(model).eval()
    before = pruned.current_config()
    params_before = int(pruned.num_parameters())
    head_stats, ffn_stats = minilm_unit_stats(pruned, batches)
    head_keep = _global_keep([s.importance for s in head_stats], spec.head_fraction, spec.min_heads_per_layer)
    ffn_keep = _global_keep([s.importance for s in ffn_stats], spec.ffn_fraction, spec.min_ffn_per_layer,
                            spec.ffn_multiple)
    for layer, hs, hk, fs, fk in zip(pruned.layers, head_stats, head_keep, ffn_stats, ffn_keep, strict=True):
        _fold_mean(layer.attention.out, hs, hk)
        _fold_mean(layer.ffn.out, fs, fk)
    prune_heads(pruned, head_keep)
    prune_ffn(pruned, ffn_keep)
    after = pruned.current_config()
    try:
        with torch.no_grad():
            pruned(*batches[0])
    except RuntimeError as e:
        raise ModelError(f"pruned MiniLM does not run: {e}") from e
    report = PruneReport(params_before=params_before, params_after=int(pruned.num_parameters()),
                         heads_before=before.num_heads, heads_after=after.num_heads,
                         ffn_before=before.intermediate_sizes, ffn_after=after.intermediate_sizes,
                         spec=spec.to_dict())
    log.info("pruned MiniLM: heads %s -> %s, ffn %s -> %s, params %d -> %d", list(before.num_heads),
             list(after.num_heads), list(before.intermediate_sizes), list(after.intermediate_sizes),
             report.params_before, report.params_after)
    return pruned, report


# --- digits MLP -----------------------------------------------------------------------------


@torch.no_grad()
def mlp_unit_stats(model: Any, x: npt.NDArray[np.float32]) -> list[UnitStats]:
    """Per hidden layer, contribution statistics of each unit to the next layer's input
    (``relu(a_j) * W_next[:, j]``), over the samples ``x``."""
    model.eval()
    acts = model.activations(torch.from_numpy(np.asarray(x, dtype=np.float32)))
    nxt = [*list(model.hidden)[1:], model.head]
    out = []
    for a, n in zip(acts, nxt, strict=True):
        w = n.weight  # [out, units]
        st = UnitStats(torch.zeros(a.shape[1]), torch.zeros(a.shape[1], w.shape[0]))
        st.sq_norm += a.pow(2).sum(0) * w.pow(2).sum(0)
        st.mean_vec += a.sum(0)[:, None] * w.T
        st.tokens += float(a.shape[0])
        out.append(st)
    return out


def prune_mlp(model: Any, x: npt.NDArray[np.float32], fraction: float, *, min_units: int = 8) -> tuple[Any, PruneReport]:
    """Remove the least important ``fraction`` of hidden units of a digits MLP (a copy),
    slicing each hidden Linear's rows and the next layer's columns.

    Raises:
        ConfigError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"prune fraction={fraction} must be in [0, 1)")
    pruned = copy.deepcopy(model).eval()
    before = pruned.current_config().hidden_sizes
    params_before = int(pruned.num_parameters())
    stats = mlp_unit_stats(pruned, x)
    keep = _global_keep([s.importance for s in stats], fraction, min_units)
    layers = list(pruned.hidden)
    for i, kept in enumerate(keep):
        _fold_mean(layers[i + 1] if i + 1 < len(layers) else pruned.head, stats[i], kept)
        idx = torch.tensor(kept, dtype=torch.long)
        layers[i] = _slice_linear(layers[i], out_idx=idx)
        if i + 1 < len(layers):
            layers[i + 1] = _slice_linear(layers[i + 1], in_idx=idx)
        else:
            pruned.head = _slice_linear(pruned.head, in_idx=idx)
    pruned.hidden = nn.ModuleList(layers)
    pruned.config = pruned.current_config()
    after = pruned.config.hidden_sizes
    report = PruneReport(params_before=params_before, params_after=int(pruned.num_parameters()),
                         heads_before=(), heads_after=(), ffn_before=tuple(before), ffn_after=tuple(after),
                         spec={"fraction": fraction, "min_units": min_units})
    log.info("pruned digits MLP: hidden %s -> %s, params %d -> %d", list(before), list(after),
             report.params_before, report.params_after)
    return pruned, report
