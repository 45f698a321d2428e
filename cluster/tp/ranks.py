"""Tensor-parallel MiniLM inside a Ray Serve replica: the rank actors and rank 0.

Process layout (``tensor_parallel: N``): the replica reserved N bundles
(``placement_group_bundles`` with ``STRICT_PACK``, so one node); it is rank 0 and starts
N-1 :class:`_TPRank` actors in bundles 1..N-1 (:class:`TensorParallelEncoder`). All N
processes join one ``torch.distributed`` group (NCCL on GPUs, gloo on CPU) and shard the
model Megatron-style (:mod:`headrace.cluster.tp.shard`). For each batch rank 0 hands the
token tensors to every rank through Ray, runs its own shard, and returns its output (every
rank ends with the same full activations after each all-reduce).

:func:`load_tp_servable` wraps the group in the regular torch servable, so tokenisation and
output handling are the same as for the unsharded model.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from headrace.client.errors import ConfigError, ModelError, ModelNotFoundError
from headrace.cluster.ops.embedded_redis import free_port
from headrace.cluster.tp.shard import (
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    SHARDED_LINEARS,
    ShardReport,
    TPModelSpec,
    _RankState,
    check_shardable,
    load_rank_model,
    megatron_plan,
    shard_minilm,
    shard_report,
    verify_sharding,
)

if TYPE_CHECKING:
    import torch

    from headrace.workers.settings import WorkerSettings

__all__ = [
    "COLUMN_PARALLEL", "ROW_PARALLEL", "SHARDED_LINEARS", "ShardReport", "TPModelSpec", "TensorParallelEncoder",
    "check_shardable", "load_rank_model", "load_tp_servable", "megatron_plan", "shard_minilm", "shard_report",
    "verify_sharding",
]

log = logging.getLogger(__name__)


class _TPRank:
    """Ray actor body for ranks 1..N-1 (decorated with ``ray.remote`` at use)."""

    def __init__(self, rank: int, world_size: int, device: str, num_threads: int) -> None:
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.state = _RankState(rank, world_size, device)

    def join(self, master_addr: str, master_port: int, backend: str, timeout_s: float,
             spec: TPModelSpec) -> dict[str, Any]:
        return self.state.join(master_addr, master_port, backend, timeout_s, spec).to_dict()

    def forward(self, input_ids: np.ndarray[Any, Any], attention_mask: np.ndarray[Any, Any]) -> None:
        # Only rank 0's copy of the (identical) output is returned to the caller.
        self.state.forward(input_ids, attention_mask)

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def close(self) -> None:
        self.state.close()


# --- rank 0 (inside the replica) ----------------------------------------------------------


class TensorParallelEncoder:
    """Rank 0 of a tensor-parallel MiniLM: owns the rank actors and runs batches over all.

    Must be constructed inside a Ray actor scheduled in a placement group of at least
    ``world_size`` bundles (a Serve replica with ``placement_group_bundles``); rank ``i``
    goes to bundle ``i`` with that bundle's resources.

    Args:
        world_size: N, number of ranks (the replica included).
        spec: the model every rank loads.
        timeout_s: group start-up timeout and collective timeout, in seconds.
        num_threads: torch intra-op threads per rank (0 = torch default).
        backend: ``auto`` (NCCL on CUDA when the bundles hold GPUs, else gloo on CPU),
            ``nccl`` or ``gloo`` (CPU even on GPU bundles).
        name: prefix of the rank actors' names (``<name>-rank<i>``, in this job's
            namespace); empty leaves them unnamed.

    Raises:
        ConfigError: not inside a big enough placement group, or an unknown backend.
        ModelError: a rank failed to start or join.
    """

    def __init__(self, world_size: int, spec: TPModelSpec, *, timeout_s: float = 120.0, num_threads: int = 1,
                 backend: str = "auto", name: str = "") -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if world_size < 2:
            raise ConfigError("TensorParallelEncoder needs world_size >= 2; run the plain model for 1")
        pg = ray.util.get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < world_size:
            raise ConfigError(
                f"tensor_parallel={world_size} needs the replica inside a placement group of "
                f"{world_size} bundles (deployment option placement_group_bundles); got "
                f"{None if pg is None else len(pg.bundle_specs)}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._broken: str | None = None
        # Called once, from the thread that noticed, when the group breaks.
        self.on_broken: Callable[[str], None] | None = None
        if backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"tensor-parallel backend {backend!r} must be auto, nccl or gloo")
        if backend == "auto":
            backend = "nccl" if float(pg.bundle_specs[0].get("GPU", 0)) > 0 else "gloo"
        device = "cuda" if backend == "nccl" else "cpu"
        if num_threads > 0:
            import torch

            torch.set_num_threads(num_threads)
        # Health probes get their own concurrency group, so they are answered while a
        # batch runs (must be declared here: .options() cannot set it).
        remote_rank = ray.remote(concurrency_groups={"health": 1})(_TPRank)  # type: ignore[call-overload]
        self._ranks: list[Any] = []
        for i in range(1, world_size):
            bundle = pg.bundle_specs[i]
            extra = {"name": f"{name}-rank{i}"} if name else {}
            self._ranks.append(remote_rank.options(
                num_cpus=float(bundle.get("CPU", 0)), num_gpus=float(bundle.get("GPU", 0)),
                # One batch at a time, in submission order: the collectives of
                # consecutive batches must pair up across ranks.
                max_concurrency=1, max_restarts=0, **extra,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i),
            ).remote(i, world_size, device, num_threads))
        master_addr = ray.util.get_node_ip_address()
        master_port = free_port()
        self._state = _RankState(0, world_size, device)
        refs = [r.join.remote(master_addr, master_port, backend, timeout_s, spec) for r in self._ranks]
        try:
            self.reports = [self._state.join(master_addr, master_port, backend, timeout_s, spec).to_dict()]
            self.reports += ray.get(refs, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - ray.get re-raises the rank's error as RayTaskError
            self.close()
            raise ModelError(f"tensor-parallel group of {world_size} failed to start: {e}") from e
        log.info("tensor-parallel group up: %d ranks, backend %s, master %s:%d",
                 world_size, backend, master_addr, master_port)

    def __call__(self, input_ids: np.ndarray[Any, Any], attention_mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Embed one tokenised batch ([B, S] int64 each) -> [B, 384] float32 unit vectors.

        Raises:
            ModelError: a rank failed (the group is then marked broken: see :meth:`healthy`).
        """
        import ray

        with self._lock:
            if self._broken:
                raise ModelError(f"tensor-parallel group is broken: {self._broken}")
            try:
                ids_ref, mask_ref = ray.put(input_ids), ray.put(attention_mask)
                refs = [r.forward.remote(ids_ref, mask_ref) for r in self._ranks]
                out = self._state.forward(input_ids, attention_mask)
                ray.get(refs, timeout=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - gloo/NCCL errors, dead actors, timeouts
                self._mark_broken(f"{type(e).__name__}: {e}")
                raise ModelError(f"tensor-parallel forward failed: {e}") from e
        result: np.ndarray[Any, Any] = out.float().cpu().numpy()
        return result

    def _mark_broken(self, reason: str) -> None:
        if self._broken is not None:
            return
        self._broken = reason
        log.error("tensor-parallel group broken: %s", reason)
        if self.on_broken is not None:
            try:
                self.on_broken(reason)
            except Exception as e:  # noqa: BLE001 - the callback must not mask the failure
                log.warning("on_broken callback failed: %s", e)

    def healthy(self) -> bool:
        """False once a batch failed on the group (it is never repaired in place)."""
        return self._broken is None

    def probe(self, timeout_s: float = 10.0) -> bool:
        """Ask every rank actor whether it is alive (marks the group broken when one died).

        A slow answer is not a death: it counts as alive, the next probe asks again.
        """
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._broken:
            return False
        try:
            ray.get([r.node_id.options(concurrency_group="health").remote() for r in self._ranks],
                    timeout=timeout_s)
        except RayActorError as e:
            self._mark_broken(f"a rank actor died: {e}")
            return False
        except GetTimeoutError:
            log.warning("tensor-parallel ranks did not answer a probe within %.0fs", timeout_s)
        return True

    def rank_nodes(self) -> list[str]:
        """Node ids of every rank, rank 0 first (to check that a group shares one node)."""
        import ray

        here = str(ray.get_runtime_context().get_node_id())
        refs = [r.node_id.options(concurrency_group="health").remote() for r in self._ranks]
        return [here] + [str(n) for n in ray.get(refs, timeout=30)]

    def close(self) -> None:
        import ray

        for r in self._ranks:
            try:
                ray.kill(r)
            except Exception as e:  # noqa: BLE001 - already dead is fine
                log.debug("killing tp rank failed: %s", e)
        self._ranks = []
        state = getattr(self, "_state", None)
        if state is not None:
            state.close()
        # Keep the replica's own pid out of any reuse confusion in logs.
        log.info("tensor-parallel group closed (pid %d)", os.getpid())


# --- the servable a tensor-parallel replica serves ------------------------------------------


class _TPModule:
    """Callable with the torch module interface ``TorchServable`` expects:
    ``module(input_ids, attention_mask) -> Tensor``, running the batch over every rank."""

    def __init__(self, encoder: TensorParallelEncoder) -> None:
        self.encoder = encoder

    def to(self, device: Any) -> _TPModule:  # the ranks place themselves
        return self

    def eval(self) -> _TPModule:
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        import torch

        out = self.encoder(input_ids.cpu().numpy(), attention_mask.cpu().numpy())
        return torch.from_numpy(out)


def load_tp_servable(settings: WorkerSettings, world_size: int, *, timeout_s: float = 120.0,
                     backend: str = "auto", name: str = "") -> tuple[Any, TensorParallelEncoder]:
    """The model ``settings`` names, served by a tensor-parallel group of ``world_size``.

    Picks the torch-format version (``minilm-torch`` entries built by
    ``models.build.build_minilm_torch``), verifies its checksums, starts the group and wraps
    it in the regular torch servable (tokenisation and output handling unchanged).

    Returns:
        ``(servable, encoder)``; ``encoder.healthy()`` tells whether the group still works.

    Raises:
        ModelNotFoundError: no such model / torch version in the repository.
        ConfigError: the entry is not a MiniLM, or does not split into ``world_size``.
        ModelError: the group failed to start.
    """
    from pathlib import Path

    from headrace.models.repository.store import ModelRepository
    from headrace.workers.backends.loader import select_manifest
    from headrace.workers.backends.torch_backend import TorchServable

    root = Path(settings.model_repo).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(f"model repository {root} does not exist; build it first (headrace models build)")
    repo = ModelRepository(root)
    m = select_manifest(repo, settings.model, settings.version, "torch")
    if m.extra.get("arch") != "minilm":
        raise ConfigError(f"{m.name}/{m.version}: tensor_parallel shards arch 'minilm' torch entries only "
                          f"(this one is {m.extra.get('arch')!r})")
    m = repo.verify(m.name, m.version)
    cfg = m.extra.get("minilm_config")
    if isinstance(cfg, dict):
        check_shardable(tuple(cfg.get("num_heads", ())), tuple(cfg.get("intermediate_sizes", ())), world_size)
    weights = repo.file_path(m, m.model_file)
    tok = repo.file_path(m, str(m.extra.get("tokenizer", "tokenizer.json")))
    encoder = TensorParallelEncoder(world_size, TPModelSpec(path=str(weights)), timeout_s=timeout_s,
                                    num_threads=settings.intra_op_threads, backend=backend, name=name)
    try:
        servable = TorchServable(m, _TPModule(encoder), tokenizer_path=tok,  # type: ignore[arg-type]
                                 device="cpu", reject_non_finite=settings.reject_non_finite)
    except Exception:
        encoder.close()
        raise
    return servable, encoder
