"""Typed app args, deployment options, the Serve config operations (scale / deploy a
version, against the in-memory deployer) and the HTTP ingress' pure helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.errors import ConfigError
from headrace.cluster.ops import lifecycle as ops
from headrace.cluster.serve.app import (
    APP_BUILDER,
    WORKER_DEPLOYMENT,
    IngressArgs,
    ModelAppArgs,
    app_config,
    build_app,
    ingress_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_args_reject_unknown_keys_and_bad_values_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="unknown ModelAppArgs"):
        ModelAppArgs.from_dict({"model": "m", "max_batchsize": 3})
    with pytest.raises(ConfigError, match="max_batch"):
        ModelAppArgs.from_dict({"model": "m", "max_batch": 0})
    with pytest.raises(ConfigError, match="tensor_parallel"):
        ModelAppArgs.from_dict({"model": "m", "fake": "affine", "tensor_parallel": 2})
    with pytest.raises(ConfigError, match="fake"):
        ModelAppArgs.from_dict({"model": "m", "fake": "bogus"})
    with pytest.raises(ConfigError, match="worker_overrides"):
        ModelAppArgs.from_dict({"model": "m", "worker_overrides": {"nonsense_s": 1}})
    with pytest.raises(ConfigError, match="worker_overrides"):
        ModelAppArgs.from_dict({"model": "m", "worker_overrides": {"lease_s": 3}})
    with pytest.raises(ConfigError, match="unknown IngressArgs"):
        IngressArgs.from_dict({"timeout": 3})


def test_worker_settings_carry_the_args() -> None:
    a = ModelAppArgs(model="m", version="2", redis_url="redis://h:1/0", max_batch=8, lease_s=4.0,
                     max_deliveries=5, worker_overrides={"dedupe_ttl_s": 60, "group": "g"})
    s = a.worker_settings(consumer="c1")
    assert (s.model, s.version, s.redis_url, s.max_batch, s.lease_s, s.max_deliveries, s.group, s.consumer,
            s.dedupe_ttl_s) == ("m", "2", "redis://h:1/0", 8, 4.0, 5, "g", "c1", 60)
    assert a.policy_settings().group == "g"


def test_deployment_options_plain_tensor_parallel_and_autoscaled() -> None:
    plain = ModelAppArgs(model="m", num_replicas=3).deployment_options()
    assert plain["name"] == WORKER_DEPLOYMENT and plain["num_replicas"] == 3
    assert plain["user_config"] == {"max_batch": 32, "preferred_batch": 0, "max_wait_ms": 5.0}
    assert "placement_group_bundles" not in plain and "autoscaling_config" not in plain
    assert plain["graceful_shutdown_timeout_s"] > ModelAppArgs().drain_timeout_s

    tp = ModelAppArgs(model="m", tensor_parallel=4, num_cpus=1.0, num_gpus=1.0).deployment_options()
    assert tp["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert tp["placement_group_strategy"] == "STRICT_PACK"
    assert tp["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}  # fits bundle 0

    auto = ModelAppArgs(model="m", autoscale=True, min_replicas=0, max_replicas=5,
                        target_backlog_per_replica=50).deployment_options()
    assert "num_replicas" not in auto
    ac = auto["autoscaling_config"]
    assert (ac["min_replicas"], ac["max_replicas"], ac["initial_replicas"]) == (0, 5, 0)
    assert ac["policy"]["policy_kwargs"]["target_backlog_per_replica"] == 50
    assert ac["policy"]["policy_kwargs"]["model"] == "m"


def test_build_app_binds_the_worker_deployment_with_the_options() -> None:
    app = build_app({"model": "m", "fake": "affine", "num_replicas": 2})
    dep = app._bound_deployment  # type: ignore[attr-defined]
    assert dep.name == WORKER_DEPLOYMENT and dep.num_replicas == 2
    with pytest.raises(ConfigError):
        build_app({"model": "m", "nope": 1})


def test_app_config_round_trips_through_the_args() -> None:
    args = ModelAppArgs(model="m", fake="affine", num_replicas=2, redis_url="redis://x:1/0")
    entry = app_config(args)
    assert entry["import_path"] == APP_BUILDER and entry["name"] == "m" and entry["route_prefix"] is None
    assert ModelAppArgs.from_dict(entry["args"]) == args
    assert "lease_s" not in entry["args"], "defaults are left out of the config"
    http = ingress_config(IngressArgs(redis_url="redis://x:1/0"))
    assert IngressArgs.from_dict(http["args"]).redis_url == "redis://x:1/0"


def test_shipped_ray_config_is_valid_and_prepared_for_deploy(tmp_path: Path) -> None:
    cfg = ops.load_config(ROOT / "ray_config.yaml", redis_url="redis://r:6380/0")
    apps = {a["name"]: a for a in cfg["applications"]}
    assert set(apps) == {"minilm", "http"}
    assert apps["minilm"]["args"]["redis_url"] == apps["http"]["args"]["redis_url"] == "redis://r:6380/0"
    assert apps["minilm"]["args"]["model_repo"] == str(ROOT / "model_repo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - name: x\n    import_path: headrace.cluster.serve.app:build_app\n"
                   "    args: {model: x, max_batch: -1}\n")
    with pytest.raises(ConfigError, match="application 'x'.*max_batch"):
        ops.load_config(bad)
    with pytest.raises(ConfigError, match="Serve config"):
        (tmp_path / "empty.yaml").write_text("foo: 1\n")
        ops.load_config(tmp_path / "empty.yaml")


def _deployed() -> ops.MemoryDeployer:
    d = ops.MemoryDeployer()
    d.deploy({"applications": [app_config(ModelAppArgs(model="a", fake="affine")),
                               app_config(ModelAppArgs(model="b", fake="length", autoscale=True), name="bee"),
                               ingress_config(IngressArgs())]})
    return d


def test_scale_is_a_deployment_override_keeping_every_other_app() -> None:
    d = _deployed()
    ops.scale(d, "a", 3)
    cfg = d.applied[-1]
    assert [a["name"] for a in cfg["applications"]] == ["a", "bee", "http"]
    a = ops.find_model_app(cfg, "a")
    assert a["deployments"] == [{"name": WORKER_DEPLOYMENT, "num_replicas": 3}]
    assert "num_replicas" not in a["args"], "args unchanged: no rolling restart"
    ops.scale(d, "a", 1)
    assert ops.find_model_app(d.applied[-1], "a")["deployments"] == [{"name": WORKER_DEPLOYMENT, "num_replicas": 1}]
    with pytest.raises(ConfigError, match="autoscales"):
        ops.scale(d, "b", 2)
    with pytest.raises(ConfigError, match="no deployed application serves model 'zzz'"):
        ops.scale(d, "zzz", 2)
    with pytest.raises(ConfigError, match=">= 1"):
        ops.scale(d, "a", 0)


def test_deploy_version_changes_only_that_apps_args() -> None:
    d = _deployed()
    before = d.applied[-1]
    ops.deploy_version(d, "b", "7")
    after = d.applied[-1]
    assert ops.find_model_app(after, "b")["args"]["version"] == "7"
    assert ops.find_model_app(after, "a") == ops.find_model_app(before, "a")
    with pytest.raises(ConfigError, match="run `headrace up`"):
        ops.deployed_config(ops.MemoryDeployer())


def test_replicas_are_read_from_serve_details() -> None:
    details: dict[str, Any] = {"applications": {"a": {"status": "RUNNING",
        "deployed_app_config": {"args": {"model": "a", "version": "3"}},
        "deployments": {"StreamWorker": {"replicas": [
            {"replica_id": "r1", "state": "RUNNING", "node_id": "n1", "node_ip": "10.0.0.1", "pid": 11},
            {"replica_id": "r2", "state": "STARTING", "node_id": "n2", "pid": None}]}}}}}
    # r1's worker registered version 2 (a rollout to 3 has not reached it); r2 has not registered.
    rows = ops.replicas(details, {("a", 11): "2"})
    assert [(r.replica_id, r.state, r.model, r.version, r.deployed, r.node_ip) for r in rows] == \
        [("r1", "RUNNING", "a", "2", "3", "10.0.0.1"), ("r2", "STARTING", "a", "?", "3", "")]
    table = ops.replica_table(rows)
    assert table.row_count == 2
    assert ops.app_problems(details | {"applications": {**details["applications"], "b": {
        "status": "DEPLOY_FAILED", "message": "boom", "deployments": {"StreamWorker": {"message": "no v9"}}}}}) == \
        [("b", "DEPLOY_FAILED", "boom | StreamWorker: no v9")]


def test_cluster_state_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_STATE_DIR", str(tmp_path))
    assert ops.ClusterState.load() is None
    st = ops.ClusterState(dashboard_url="http://127.0.0.1:8265", ray_address="127.0.0.1:1", redis_url="redis://x/0",
                          redis_pid=None, metrics_port=9, config_path="c.yaml", started_ray=True, ray_pid=123)
    st.save()
    assert ops.ClusterState.load() == st
    (tmp_path / ops.STATE_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="headrace down"):
        ops.ClusterState.load()
    st.save()
    with pytest.raises(ConfigError, match="already up"):
        ops.up(ROOT / "ray_config.yaml")


def test_ingress_maps_wire_codes_to_http_statuses_and_decodes_json_tensors() -> None:
    from headrace.cluster.serve.http_body import parse_inputs
    from headrace.cluster.serve.ingress import http_status

    assert http_status(E.QUEUE_FULL) == 429
    assert http_status(E.DEADLINE_EXCEEDED) == 504
    assert http_status(E.BAD_SHAPE) == 400 and http_status(E.UNKNOWN_MODEL) == 404
    assert http_status(E.PAYLOAD_TOO_LARGE) == 413 and http_status("some_future_code") == 500
    out = parse_inputs({"x": {"dtype": "int32", "shape": [2, 2], "data": [1, 2, 3, 4]}, "y": [[1.5, 2.5]]})
    assert out["x"].dtype == np.int32 and out["x"].tolist() == [[1, 2], [3, 4]]
    assert out["y"].dtype == np.float32 and out["y"].shape == (1, 2)
    with pytest.raises(E.InvalidTensorError) as shape:
        parse_inputs({"x": {"dtype": "float32", "shape": [3], "data": [1, 2]}})
    assert shape.value.code == E.BAD_SHAPE
    with pytest.raises(E.InvalidTensorError) as dtype:
        parse_inputs({"x": {"dtype": "complex64", "shape": [1], "data": [1]}})
    assert dtype.value.code == E.BAD_DTYPE
    with pytest.raises(E.InvalidTensorError) as ragged:
        parse_inputs({"x": [[1.0], [1.0, 2.0]]})
    assert ragged.value.code == E.BAD_SHAPE


def test_ingress_args_take_api_key_digests_only() -> None:
    from headrace.cluster.serve.auth import ApiKeys, key_entry

    entry = key_entry("web", "s3cret")
    args = IngressArgs.from_dict({"api_keys": [entry]})
    assert args.api_keys == (entry,) and "s3cret" not in entry
    for bad in (["web:s3cret"], ["bad name:" + "0" * 64], ["anonymous:" + "0" * 64]):
        with pytest.raises(ConfigError, match="api_keys"):
            IngressArgs.from_dict({"api_keys": bad})
    keys = ApiKeys([entry], env={"HEADRACE_INGRESS_API_KEYS": key_entry("batch", "other")})
    assert keys.callers() == ["batch", "web"]
    caller = keys.authenticate({"authorization": "Bearer s3cret"})
    assert caller is not None and caller.name == "web" and caller.authenticated
    assert keys.authenticate({"x-api-key": "other"}).name == "batch"  # type: ignore[union-attr]
    assert keys.authenticate({"x-api-key": "nope"}) is None and keys.authenticate({}) is None
    assert not ApiKeys([], env={}).authenticate({}).authenticated  # type: ignore[union-attr]


def test_backlog_tap_remembers_the_last_backlog_for_autoscaling() -> None:
    from headrace.cluster.serve.autoscale import LAG_METRIC, PENDING_METRIC
    from headrace.cluster.serve.replica import StreamWorkerReplica, _BacklogTap
    from headrace.workers.testing.metrics import InMemoryMetrics

    inner = InMemoryMetrics()
    tap = _BacklogTap(inner)  # type: ignore[arg-type]
    tap.set_backlog(12, 3)
    tap.observe_batch(4, 0.01)
    tap.observe_request("ok", "", 0.001, 0.002)
    assert (tap.lag, tap.pending, inner.lag, inner.pending, inner.batch_sizes, inner.count("ok")) == \
        (12, 3, 12, 3, [4], 1)
    replica = StreamWorkerReplica.__new__(StreamWorkerReplica)
    replica.metrics = tap
    assert replica.record_autoscaling_stats() == {LAG_METRIC: 12.0, PENDING_METRIC: 3.0}
