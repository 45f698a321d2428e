"""Megatron-style sharding of our MiniLM module: the plan, the divisibility rules, and the
real thing in 2 local processes over gloo (DTensor ``parallelize_module``) against the
unsharded model, on a small randomly initialised MiniLM-shaped module."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from headrace.client.errors import ConfigError
from headrace.cluster.tp.ranks import (
    SHARDED_LINEARS,
    TPModelSpec,
    check_shardable,
    load_rank_model,
    megatron_plan,
    shard_report,
    verify_sharding,
)
from headrace.models.builtin.minilm import MiniLM, MiniLMConfig

SMALL: dict[str, Any] = {"vocab_size": 100, "hidden_size": 64, "head_dim": 16, "num_heads": [4, 4],
                         "intermediate_sizes": [128, 128], "max_position": 32, "source_layers": [0, 1]}


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (3, 9)).astype(np.int64)
    mask = np.ones((3, 9), np.int64)
    ids[1, 5:], mask[1, 5:] = 0, 0  # a padded row: masking must survive the sharding
    return ids, mask


def test_plan_is_column_then_row_parallel_per_sublayer() -> None:
    model = MiniLM(MiniLMConfig.from_dict(SMALL))
    plan = megatron_plan(model)
    assert len(plan) == 2 * len(SHARDED_LINEARS)
    for i in range(2):
        for name in ("attention.q", "attention.k", "attention.v", "ffn.inter"):
            assert isinstance(plan[f"layers.{i}.{name}"], ColwiseParallel)
        for name in ("attention.out", "ffn.out"):
            assert isinstance(plan[f"layers.{i}.{name}"], RowwiseParallel)
    # Every planned name is a real submodule.
    names = dict(model.named_modules())
    assert all(k in names for k in plan)


def test_check_shardable_refuses_uneven_splits_with_a_fix_it_message() -> None:
    check_shardable((12, 12), (1536, 1536), 2)
    check_shardable((12,), (1536,), 4)
    with pytest.raises(ConfigError, match="divisor of 12"):
        check_shardable((12, 12), (1536, 1536), 5)
    with pytest.raises(ConfigError, match="layer 1"):
        check_shardable((12, 6), (1536, 1536), 4)  # a head-pruned layer
    with pytest.raises(ConfigError, match=">= 1"):
        check_shardable((12,), (1536,), 0)


def test_shard_report_of_an_unsharded_model_counts_everything_whole() -> None:
    model = load_rank_model(TPModelSpec(config=SMALL, seed=1))
    rep = shard_report(model)
    linear_bytes = sum(p.numel() * 4 for n, p in model.named_parameters()
                       if any(n.rsplit(".", 1)[0].endswith(s) for s in SHARDED_LINEARS))
    assert rep.sharded_local_bytes == rep.sharded_full_bytes == linear_bytes
    assert rep.sharded_fraction == 1.0
    assert rep.replicated_bytes == sum(p.numel() * 4 for p in model.parameters()) - linear_bytes


def test_same_seed_gives_identical_weights_on_every_rank() -> None:
    a = load_rank_model(TPModelSpec(config=SMALL, seed=7))
    b = load_rank_model(TPModelSpec(config=SMALL, seed=7))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_two_gloo_ranks_match_the_unsharded_model_and_hold_half_the_linears() -> None:
    ids, mask = _batch()
    out = verify_sharding(2, TPModelSpec(config=SMALL, seed=3), ids, mask)
    assert out["max_abs_diff"] <= 1e-5
    assert out["outputs"].shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(out["outputs"], axis=1), 1.0, atol=1e-5)
    assert [r["rank"] for r in out["reports"]] == [0, 1]
    for rep in out["reports"]:
        # Column shards are exactly half; row-parallel biases stay whole (tiny).
        assert 0.5 <= rep["sharded_fraction"] < 0.52
        assert rep["world_size"] == 2
