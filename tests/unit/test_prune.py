"""Structured pruning: real slicing, exact equivalences, importance statistics, export."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from headrace.client.errors import ConfigError
from headrace.models.builtin import digits as DG
from headrace.models.builtin.minilm import MiniLM, MiniLMConfig
from headrace.models.compress.prune import (
    PruneSpec,
    UnitStats,
    minilm_unit_stats,
    prune_ffn,
    prune_heads,
    prune_minilm,
    prune_mlp,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny(heads: tuple[int, ...] = (4, 4), ffn: int = 64) -> MiniLM:
    torch.manual_seed(0)
    cfg = MiniLMConfig(vocab_size=200, hidden_size=32, head_dim=8, num_heads=heads,
                       intermediate_sizes=(ffn,) * len(heads), max_position=64, source_layers=tuple(range(len(heads))))
    model = MiniLM(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so slicing mistakes show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 200, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        mask[3, 3:] = 0
        out.append((ids, mask))
    return out


def emb(model: MiniLM, bs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b) for b in bs])


def test_zero_pruning_is_exactly_the_same_model() -> None:
    model = tiny()
    pruned, rep = prune_minilm(model, batches(), PruneSpec(head_fraction=0.0, ffn_fraction=0.0,
                                                           min_heads_per_layer=0, min_ffn_per_layer=0))
    assert rep.params_after == rep.params_before == model.num_parameters()
    torch.testing.assert_close(emb(pruned, batches(seed=5)), emb(model, batches(seed=5)), rtol=0, atol=0)
    assert pruned is not model


def test_prune_heads_slices_and_equals_zeroed_heads() -> None:
    model = tiny()
    keep = [[0, 2], [1, 2, 3]]
    masked = copy.deepcopy(model)
    with torch.no_grad():  # reference: same model with removed heads' output columns zeroed
        for layer, kept in zip(masked.layers, keep, strict=True):
            for h in range(4):
                if h not in kept:
                    layer.attention.out.weight[:, h * 8:(h + 1) * 8] = 0
    pruned = copy.deepcopy(model)
    prune_heads(pruned, keep)
    att0, att1 = pruned.layers[0].attention, pruned.layers[1].attention
    assert (att0.num_heads, att1.num_heads) == (2, 3)
    assert att0.q.weight.shape == (16, 32) and att0.k.bias.shape == (16,) and att0.out.weight.shape == (32, 16)
    assert att1.v.weight.shape == (24, 32)
    assert pruned.config.num_heads == (2, 3)
    assert pruned.num_parameters() < model.num_parameters()
    torch.testing.assert_close(emb(pruned, batches()), emb(masked, batches()), atol=1e-6, rtol=1e-5)


def test_prune_ffn_slices_and_equals_zeroed_neurons() -> None:
    model = tiny()
    keep = [list(range(0, 64, 2)), list(range(40))]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in zip(masked.layers, keep, strict=True):
            drop = [j for j in range(64) if j not in kept]
            layer.ffn.out.weight[:, drop] = 0
    pruned = copy.deepcopy(model)
    prune_ffn(pruned, keep)
    assert pruned.layers[0].ffn.inter.weight.shape == (32, 32) and pruned.layers[1].ffn.out.weight.shape == (32, 40)
    assert pruned.config.intermediate_sizes == (32, 40)
    torch.testing.assert_close(emb(pruned, batches()), emb(masked, batches()), atol=1e-6, rtol=1e-5)


def test_prune_rejects_bad_indices() -> None:
    with pytest.raises(ConfigError, match="one head list per layer"):
        prune_heads(tiny(), [[0]])
    with pytest.raises(ConfigError, match="out of range"):
        prune_ffn(tiny(), [[0, 999], [1]])
    with pytest.raises(ConfigError):
        PruneSpec(head_fraction=1.0)


def test_unit_stats_importance_is_variance_around_the_mean() -> None:
    st = UnitStats(torch.zeros(2), torch.zeros(2, 3))
    contrib = torch.zeros(1, 4, 2, 3)
    contrib[..., 0, :] = torch.tensor([1.0, 2.0, 3.0])  # unit 0: constant -> foldable into the bias
    contrib[0, :, 1, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # unit 1: varies, mean 0
    st.add(contrib, torch.ones(1, 4))
    torch.testing.assert_close(st.importance, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(st.mean[0], torch.tensor([1.0, 2.0, 3.0]))


def test_global_pruning_respects_fractions_floors_and_runs(tmp_path: Path) -> None:
    from headrace.models.compress.export import export_onnx

    model = tiny(heads=(4, 4, 4), ffn=64)
    heads, ffn = minilm_unit_stats(model, batches())
    assert [len(h.importance) for h in heads] == [4, 4, 4] and all((h.importance >= 0).all() for h in heads)
    spec = PruneSpec(head_fraction=0.5, ffn_fraction=0.5, min_heads_per_layer=1, min_ffn_per_layer=8, ffn_multiple=8)
    pruned, rep = prune_minilm(model, batches(), spec)
    assert sum(rep.heads_after) == 6 and all(h >= 1 for h in rep.heads_after)
    assert all(f % 8 == 0 and f >= 8 for f in rep.ffn_after) and sum(rep.ffn_after) <= 0.5 * 192 + 3 * 7
    assert rep.params_after < rep.params_before
    # The pruned module exports with per-layer head counts and matches torch.
    ids, mask = batches(1)[0]
    report = export_onnx(pruned, {"input_ids": ids, "attention_mask": mask}, tmp_path / "p.onnx",
                         output_names=["embeddings"],
                         dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    assert report.max_abs_diff < 1e-4


def test_mean_folding_beats_plain_removal() -> None:
    """Folding the removed units' mean contribution into the output bias keeps the pruned
    model closer to the original than slicing alone, on data it was not measured on."""
    model = tiny(heads=(4, 4), ffn=64)
    cal, held = batches(6, seed=1), batches(6, seed=2)
    folded, _ = prune_minilm(model, cal, PruneSpec(head_fraction=0.0, ffn_fraction=0.5, min_ffn_per_layer=8,
                                                   ffn_multiple=1))
    keep = []  # recover which neurons survived from the sliced weights
    for orig, new in zip(model.layers, folded.layers, strict=True):
        rows = orig.ffn.inter.weight
        keep.append([int((rows == r).all(dim=1).nonzero()[0]) for r in new.ffn.inter.weight])
    plain = copy.deepcopy(model)
    prune_ffn(plain, keep)
    ref = emb(model, held)
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb(folded, held), ref).mean() > cos(emb(plain, held), ref).mean()


def test_digits_mlp_pruning() -> None:
    data = DG.load_data()
    model, rep = DG.train(data, epochs=20)
    same, r0 = prune_mlp(model, data.x_train, 0.0)
    np.testing.assert_array_equal(DG.predict_logits(same, data.x_test), DG.predict_logits(model, data.x_test))
    assert r0.params_after == r0.params_before
    pruned, r = prune_mlp(model, data.x_train, 0.5, min_units=8)
    assert sum(r.ffn_after) == round(0.5 * sum(r.ffn_before))
    assert pruned.hidden[0].out_features == r.ffn_after[0] and pruned.hidden[1].in_features == r.ffn_after[0]
    assert pruned.head.in_features == r.ffn_after[1]
    assert r.params_after < 0.5 * r.params_before
    # Slicing alone (with the removed units' mean folded into the next bias) keeps most of
    # the accuracy; a few epochs of fine-tuning recover the rest.
    assert DG.accuracy(pruned, data.x_test, data.y_test) > 0.85
    tuned, ft = DG.train(data, epochs=5, lr=5e-4, model=pruned)
    assert ft.test_accuracy >= rep.test_accuracy - 0.02
    assert tuned.current_config().hidden_sizes == tuple(r.ffn_after)
