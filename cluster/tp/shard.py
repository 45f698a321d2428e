"""Megatron-style sharding of our MiniLM torch module (pure torch, no Ray).

Per encoder layer (:func:`megatron_plan`):

    attention.q / k / v   column-parallel  (each rank computes num_heads / N whole heads)
    attention.out         row-parallel     (partial sums -> one all-reduce)
    ffn.inter             column-parallel  (1 / N of the FFN width, GELU is elementwise)
    ffn.out               row-parallel     (partial sums -> one all-reduce)

So every sublayer costs exactly one all-reduce; embeddings and LayerNorms stay replicated.
The plan is applied with ``torch.distributed.tensor.parallel.parallelize_module`` (DTensor),
verified on CPU/gloo against the unsharded model (:func:`verify_sharding`,
``tests/unit/test_tp.py``); with ``src_data_rank=None`` every rank cuts its own shard out
of the (identical) weights it loaded, so no weights cross the wire and each rank keeps only
its shard afterwards (:func:`shard_report` measures the storage really held).

The Ray side (rank actors inside a Serve replica's placement group) is :mod:`headrace.cluster.tp.ranks`.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError
from headrace.cluster.ops.embedded_redis import free_port

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ParallelStyle

    from headrace.models.builtin.minilm import MiniLM

log = logging.getLogger(__name__)

COLUMN_PARALLEL = ("attention.q", "attention.k", "attention.v", "ffn.inter")
ROW_PARALLEL = ("attention.out", "ffn.out")
SHARDED_LINEARS = COLUMN_PARALLEL + ROW_PARALLEL

# --- sharding (pure torch) ---------------------------------------------------------------


def megatron_plan(model: MiniLM) -> dict[str, ParallelStyle]:
    """The module-FQN -> parallel style plan for :func:`parallelize_module`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, ParallelStyle] = {}
    for i in range(len(model.layers)):
        for name in COLUMN_PARALLEL:
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ROW_PARALLEL:
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def check_shardable(num_heads: tuple[int, ...], intermediate_sizes: tuple[int, ...], world_size: int) -> None:
    """Whole heads and equal FFN slices per rank, or refuse.

    Raises:
        ConfigError: ``world_size`` < 1, or a layer whose head count / FFN width is not a
            positive multiple of ``world_size`` (e.g. a head-pruned model).
    """
    if world_size < 1:
        raise ConfigError(f"tensor_parallel must be >= 1, got {world_size}")
    for i, (h, inter) in enumerate(zip(num_heads, intermediate_sizes, strict=True)):
        if h <= 0 or h % world_size or inter <= 0 or inter % world_size:
            raise ConfigError(
                f"layer {i} has {h} heads and FFN width {inter}: tensor_parallel={world_size} needs both "
                f"to be positive multiples of it; pick a divisor of {h} (and of {inter})")


def shard_minilm(model: MiniLM, mesh: DeviceMesh) -> MiniLM:
    """Shard ``model`` in place over the 1-D ``mesh`` (this rank keeps 1/N of each sharded
    Linear) and return it. Every rank must call this with identical weights.

    Raises:
        ConfigError: the architecture does not split evenly (:func:`check_shardable`).
    """
    from torch.distributed.tensor.parallel import parallelize_module

    world = mesh.size()
    cfg = model.current_config()
    check_shardable(cfg.num_heads, cfg.intermediate_sizes, world)
    if world == 1:
        return model
    parallelize_module(model, mesh, megatron_plan(model), src_data_rank=None)
    for layer in model.layers:
        # The attention module reshapes to [B, S, num_heads, head_dim]; after the
        # column split this rank holds num_heads / N of them.
        layer.attention.num_heads //= world  # type: ignore[union-attr,operator]
    return model


@dataclass(frozen=True)
class ShardReport:
    """Parameter bytes of one rank.

    Attributes:
        rank / world_size: position in the group.
        sharded_local_bytes: storage this rank holds for the sharded Linears (weights and
            biases; row-parallel biases are replicated and counted whole).
        sharded_full_bytes: what those Linears take unsharded.
        replicated_bytes: everything else (embeddings, LayerNorms).
    """

    rank: int
    world_size: int
    sharded_local_bytes: int
    sharded_full_bytes: int
    replicated_bytes: int

    @property
    def sharded_fraction(self) -> float:
        return self.sharded_local_bytes / max(1, self.sharded_full_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size,
                "sharded_local_bytes": self.sharded_local_bytes,
                "sharded_full_bytes": self.sharded_full_bytes,
                "replicated_bytes": self.replicated_bytes, "sharded_fraction": self.sharded_fraction}


def shard_report(model: torch.nn.Module, rank: int = 0, world_size: int = 1) -> ShardReport:
    """Measure the bytes this process really holds (storage of the local shards, so a
    shard that still aliased the full weight would be counted whole)."""
    from torch.distributed.tensor import DTensor

    local = full = other = 0
    for name, p in model.named_parameters():
        module_path = name.rsplit(".", 1)[0]
        data = p.to_local() if isinstance(p, DTensor) else p.data
        held = data.untyped_storage().nbytes()
        if any(module_path.endswith(s) for s in SHARDED_LINEARS):
            local += held
            full += p.numel() * p.element_size()  # DTensor.numel() is the global size
        else:
            other += held
    return ShardReport(rank=rank, world_size=world_size, sharded_local_bytes=local,
                       sharded_full_bytes=full, replicated_bytes=other)


# --- one rank's model ---------------------------------------------------------------------


@dataclass(frozen=True)
class TPModelSpec:
    """What every rank loads: a MiniLM weights folder (None = the packaged model) or, for
    tests, a random MiniLM of ``config`` seeded with ``seed``."""

    path: str | None = None
    config: dict[str, Any] | None = None
    seed: int | None = None


def load_rank_model(spec: TPModelSpec) -> MiniLM:
    """Load the identical full model on every rank (before sharding).

    Raises:
        ModelNotFoundError / ModelError: from :func:`headrace.models.builtin.minilm.load_minilm`.
    """
    import torch

    from headrace.models.builtin.minilm import MiniLM, MiniLMConfig, load_minilm

    if spec.seed is not None:
        torch.manual_seed(spec.seed)
        return MiniLM(MiniLMConfig.from_dict(spec.config or {})).eval()
    return load_minilm(spec.path, config=spec.config)


class _RankState:
    """A process's membership in a TP group and its shard (rank 0 and the actors alike)."""

    def __init__(self, rank: int, world_size: int, device: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.model: MiniLM | None = None

    def join(self, master_addr: str, master_port: int, backend: str, timeout_s: float, spec: TPModelSpec) -> ShardReport:
        """Join the process group (blocks until all ranks arrived), load and shard."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        try:
            dist.init_process_group(
                backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                rank=self.rank, world_size=self.world_size,
                # A dead peer must turn into an error, not a forever-blocked collective.
                timeout=datetime.timedelta(seconds=timeout_s))
            mesh = init_device_mesh(self.device, (self.world_size,))
            model = load_rank_model(spec).to(self.device)
            self.model = shard_minilm(model, mesh)
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelError(f"tensor-parallel rank {self.rank}/{self.world_size} failed to start: {e}") from e
        report = shard_report(self.model, self.rank, self.world_size)
        log.info("tp rank %d/%d ready: %d of %d sharded bytes", self.rank, self.world_size,
                 report.sharded_local_bytes, report.sharded_full_bytes)
        return report

    def forward(self, input_ids: np.ndarray[Any, Any], attention_mask: np.ndarray[Any, Any]) -> torch.Tensor:
        import torch

        if self.model is None:
            raise ModelError(f"tensor-parallel rank {self.rank} has no model (join first)")
        with torch.inference_mode():
            # Copies: arrays that came through Ray's object store are read-only.
            ids = torch.from_numpy(np.array(input_ids, dtype=np.int64)).to(self.device)
            mask = torch.from_numpy(np.array(attention_mask, dtype=np.int64)).to(self.device)
            out: torch.Tensor = self.model(ids, mask)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        self.model = None
        if dist.is_initialized():
            dist.destroy_process_group()


# --- offline check (no Ray): N local processes over gloo ------------------------------------


def _local_rank_main(rank: int, world_size: int, port: int, spec: TPModelSpec,
                     input_ids: np.ndarray[Any, Any], attention_mask: np.ndarray[Any, Any], queue: Any) -> None:
    import torch

    torch.set_num_threads(1)
    state = _RankState(rank, world_size, "cpu")
    try:
        report = state.join("127.0.0.1", port, "gloo", 60.0, spec)
        out = state.forward(input_ids, attention_mask).numpy()
        queue.put((rank, report.to_dict(), out, ""))
    except Exception as e:  # noqa: BLE001 - reported to the parent instead of a silent exit code
        queue.put((rank, None, None, f"{type(e).__name__}: {e}"))
    finally:
        state.close()


def verify_sharding(world_size: int, spec: TPModelSpec, input_ids: np.ndarray[Any, Any],
                    attention_mask: np.ndarray[Any, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    """Run the sharded model in ``world_size`` local processes (gloo on CPU) and compare
    every rank's output with the unsharded model in this process.

    Returns:
        ``{"max_abs_diff": float, "reports": [ShardReport dicts by rank], "outputs": [B, 384]}``.

    Raises:
        ModelError: a rank failed or did not answer within ``timeout_s``.
    """
    import multiprocessing as mp
    import queue as queue_mod

    import torch

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_local_rank_main, args=(r, world_size, port, spec, input_ids, attention_mask, q),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    with torch.inference_mode():
        ref = load_rank_model(spec)(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()
    got: dict[int, tuple[dict[str, Any], np.ndarray[Any, Any]]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            try:
                rank, report, out, err = q.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in got]
                if dead or time.monotonic() > deadline:
                    raise ModelError(f"tensor-parallel ranks {dead or 'all'} died or did not answer "
                                     f"within {timeout_s}s") from None
                continue
            if err:
                raise ModelError(f"tensor-parallel rank {rank} failed: {err}")
            got[rank] = (report, out)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    diff = max(float(np.abs(got[r][1] - ref).max()) for r in got)
    return {"max_abs_diff": diff, "reports": [got[r][0] for r in sorted(got)], "outputs": got[0][1]}
