"""Versions as an operator expects them, on a real Ray Serve instance:

* ``deploy`` of a version the repository does not have is refused before any replica
  changes (same replicas, same deployed config, a clear error listing the versions);
* a compressed MiniLM (ORT dynamic int8) published as version 2 of ``minilm`` is rolled out
  with ``deploy`` under load: every request answered once, by v1 then v2;
* the replica table shows the version each replica's worker really serves (registry).

The int8 artifact is published through the repository API (``ModelRepository.add``), the
same call ``compress``'s publish-as-a-version uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from headrace.client import errors as E
from headrace.cluster.cli.status_data import served_versions
from headrace.cluster.ops import lifecycle as ops
from headrace.cluster.serve.app import IngressArgs, ModelAppArgs, app_config, ingress_config
from headrace.models.repository.store import Manifest, ModelRepository
from tests.support.ray import RawProducer, RayEnv, local_ray, serve_replicas, wait_until

pytestmark = pytest.mark.timeout(420)

TEXTS = ["The cat sat on the mat.", "Redis streams keep requests.", "short", "a rolling update loses nothing"]


@pytest.fixture(scope="module")
def env() -> Iterator[RayEnv]:
    with local_ray(num_cpus=4) as e:
        yield e


def _publish(repo: ModelRepository, src: ModelRepository, m: Manifest, model_file: Path | None = None,
             **changes: object) -> Manifest:
    files = {f.path: src.file_path(m, f.path) for f in m.files}
    if model_file is not None:
        files[m.model_file] = model_file
    fields = dict(format=m.format, inputs=m.inputs, outputs=m.outputs, precision=m.precision, backend=m.backend,
                  max_batch=m.max_batch, preprocess=m.preprocess, postprocess=m.postprocess, model_file=m.model_file,
                  source=m.source, recipe=m.recipe, extra=m.extra, description=m.description)
    fields.update(changes)
    return repo.add("minilm", files, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def repo(model_repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from headrace.models.builtin.build import ensure_minilm
    from headrace.models.compress.quantize import quantize_dynamic_int8

    shared = ModelRepository(model_repo_dir)
    v1 = ensure_minilm(model_repo_dir)
    int8 = model_repo_dir.parent / "byom-minilm-int8.onnx"
    if not int8.is_file():  # cached across runs (.cache/): quantising MiniLM takes a while
        quantize_dynamic_int8(shared.file_path(v1, v1.model_file), int8)
    root = tmp_path_factory.mktemp("deploy-repo")
    repo = ModelRepository(root)
    assert _publish(repo, shared, v1).version == "1"
    v2 = _publish(repo, shared, v1, int8, precision="int8",
                  recipe=[*v1.recipe, {"step": "quantize", "params": {"mode": "dynamic_int8"}}])
    assert v2.version == "2"
    return root


def _http_metadata(env: RayEnv) -> None:
    """GET /v1/models and /v1/models/{model}: KServe-style metadata from the registry."""
    with httpx.Client(base_url=f"http://127.0.0.1:{env.http_port}", timeout=30) as h:
        meta = wait_until(lambda: (m := h.get("/v1/models/minilm").json()).get("workers") == 2 and m, 60,
                          what="both minilm workers in GET /v1/models/minilm")
        assert meta["versions"] == ["1"] and meta["accepts_text"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1], "sample_shape": [],
                                   "dtype": "str"}]
        assert meta["outputs"][0]["name"] == "embeddings" and meta["outputs"][0]["shape"] == [-1, 384]
        assert h.get("/v1/models").json()["models"] == ["minilm"]
        missing = h.get("/v1/models/minlm")
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_model"


def test_missing_version_refused_then_compressed_version_rolled_out_under_load(env: RayEnv, repo: Path) -> None:
    args = ModelAppArgs.from_dict({"model": "minilm", "version": "1", "model_repo": str(repo),
                                   "redis_url": env.redis_url, "num_replicas": 2, "num_cpus": 0.5, "max_batch": 8,
                                   "lease_s": 5.0, "drain_timeout_s": 20.0})
    http = ingress_config(IngressArgs(redis_url=env.redis_url, num_cpus=0.25))
    ops.apply(env.deployer, {"applications": [app_config(args), http]}, wait_s=240)
    before = {x.replica_id for x in serve_replicas(env.deployer, "minilm")}
    assert len(before) == 2
    _http_metadata(env)

    t0 = time.monotonic()
    with pytest.raises(E.ModelNotFoundError, match=r"no version '9'.*versions: \['1', '2'\]"):
        ops.deploy_version(env.deployer, "minilm", "9")
    assert time.monotonic() - t0 < 10
    assert {x.replica_id for x in serve_replicas(env.deployer, "minilm")} == before
    assert ops.find_model_app(ops.deployed_config(env.deployer), "minilm")["args"]["version"] == "1"

    r = env.r()
    prod = RawProducer(r, "minilm")
    stop, rolled = threading.Event(), threading.Event()
    after_rollout: list[str] = []

    def produce() -> None:
        while not stop.is_set():
            ids = prod.send_texts(TEXTS)
            if rolled.is_set():
                after_rollout.extend(ids)
            time.sleep(0.1)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        ops.deploy_version(env.deployer, "minilm", "2", wait_s=300)
        rolled.set()
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(10)
    results = prod.wait_all(timeout_s=180)
    assert prod.duplicates() == {}
    assert {res.request_id for res in results} == set(prod.sent)
    assert all(res.ok for res in results), [res.message for res in results if not res.ok][:3]
    assert {res.version for res in results} == {"1", "2"}
    by_id = {res.request_id: res for res in results}
    assert after_rollout and all(by_id[i].version == "2" for i in after_rollout)

    seen: list[object] = []

    def table_says_v2() -> bool:
        served = served_versions(r, "headrace")
        rows = [(x.replica_id, x.state, x.pid, x.version, x.deployed)
                for x in ops.replicas(env.deployer.details(), served) if x.model == "minilm"]
        seen[:] = [rows, served]
        return len(rows) == 2 and all(row[3:] == ("2", "2") for row in rows)

    try:
        wait_until(table_says_v2, 60, what="both replicas registered as serving v2")
    except AssertionError as e:
        raise AssertionError(f"{e}: last seen {seen}") from None
