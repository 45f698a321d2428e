"""Deployment artifacts (deploy/): they agree with ray_config.yaml and with each other.

* deploy/serve_config.yaml and the RayService's serveConfigV2 hold ray_config.yaml's
  applications: same names, builders and arguments, except where the model repository
  lives on the cluster;
* every Ray pod of the RayService gets the Redis URL from the Secret, the model repository
  volume at the path the config names, and the image deploy/Dockerfile builds;
* the Dockerfile (cannot be built here: no Docker daemon) references only existing extras
  and files; the `ray up` config passes Ray's own cluster-config validation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from headrace.cluster.serve.config import validate_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Arguments that name a place on the cluster, not how the application behaves.
CLUSTER_BOUND = frozenset({"model_repo"})
REDIS_ENV = "HEADRACE_REDIS_URL"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rayservice() -> dict[str, Any]:
    return load(DEPLOY / "kuberay" / "rayservice.yaml")  # type: ignore[no-any-return]


def serve_config() -> dict[str, Any]:
    return load(DEPLOY / "serve_config.yaml")  # type: ignore[no-any-return]


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def image_name() -> str:
    """The tag the Dockerfile's documented build command gives the image."""
    m = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", dockerfile())
    assert m, "the Dockerfile documents its build command"
    return m.group(1)


def ray_image() -> str:
    m = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile(), re.M)
    assert m
    return m.group(1)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def model_mount() -> str:
    repos = {a["args"]["model_repo"] for a in serve_config()["applications"] if "model_repo" in a.get("args", {})}
    assert len(repos) == 1
    return repos.pop()


def pod_templates() -> list[dict[str, Any]]:
    spec = rayservice()["spec"]["rayClusterConfig"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_cluster_config_holds_the_applications_of_ray_config() -> None:
    local = load(ROOT / "ray_config.yaml")["applications"]
    cluster = serve_config()["applications"]
    assert [a["name"] for a in cluster] == [a["name"] for a in local]
    for mine, theirs in zip(cluster, local, strict=True):
        assert {k: v for k, v in mine.items() if k != "args"} == {k: v for k, v in theirs.items() if k != "args"}
        strip = {k: v for k, v in mine["args"].items() if k not in CLUSTER_BOUND}
        assert strip == {k: v for k, v in theirs["args"].items() if k not in CLUSTER_BOUND}, mine["name"]
        assert set(mine["args"]) & CLUSTER_BOUND == set(theirs["args"]) & CLUSTER_BOUND
        for key in set(mine["args"]) & CLUSTER_BOUND:
            assert os.path.isabs(mine["args"][key]), f"{mine['name']}.{key} must be absolute on a cluster"


def test_rayservice_serves_the_cluster_config() -> None:
    rs = rayservice()
    assert (rs["apiVersion"], rs["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == serve_config()


def test_cluster_config_passes_serve_schema_and_our_builders() -> None:
    validate_config(serve_config())  # ServeDeploySchema + ModelAppArgs / IngressArgs of every app
    broken = serve_config()
    broken["applications"][0]["args"]["max_batchh"] = 8
    with pytest.raises(Exception, match="max_batchh"):
        validate_config(broken)


def test_every_ray_pod_gets_the_secret_the_model_repo_and_the_image() -> None:
    claims = {}
    for template in pod_templates():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            assert c["image"] == image_name()
            env = {e["name"]: e for e in c["env"]}
            assert "value" not in env[REDIS_ENV], "the Redis URL holds a password: only from a Secret"
            assert env[REDIS_ENV]["valueFrom"]["secretKeyRef"] == {"name": "headrace-redis", "key": "url"}
            mounts = [m for m in c["volumeMounts"] if m["mountPath"] == model_mount()]
            assert len(mounts) == 1 and mounts[0].get("readOnly") is True
            claims[c["name"]] = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = load(DEPLOY / "kuberay" / "model-repo-pvc.yaml")
    assert set(claims.values()) == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_ray_versions_agree() -> None:
    image_ray = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)", ray_image())
    assert image_ray, ray_image()
    assert rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == image_ray.group(1)
    ray_req = next(Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["ray"]
                   if r.startswith("ray"))
    assert ray_req.specifier.contains(image_ray.group(1)), "the image's Ray meets the ray extra"
    py = Version(f"3.{image_ray.group(2)}")
    assert py in Requirement(f"python{pyproject()['project']['requires-python']}").specifier
    assert image_name().endswith(f":{pyproject()['project']['version']}"), "image tag = package version"


def test_no_credentials_in_the_manifests() -> None:
    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    docs = [rayservice(), serve_config(), load(DEPLOY / "ray-up" / "cluster.yaml"),
            yaml.safe_load(rayservice()["spec"]["serveConfigV2"])]
    for s in (s for d in docs for s in strings(d)):
        assert not re.search(r"rediss?://[^/\s]*@", s), s


def dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if pattern == "*" or path.rstrip("/") == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerfile_names_existing_extras_and_files() -> None:
    text = dockerfile()
    extras = set(pyproject()["project"]["optional-dependencies"])
    chosen = [set(m.split(",")) for m in re.findall(r"EXTRAS=([a-z0-9,-]+)", text)]
    assert len(chosen) >= 2, "the default and the GPU example"
    for group in chosen:
        assert group <= extras, group - extras
        assert "ray" in group and len(group & {"worker-cpu", "worker-gpu"}) == 1, group
    copies = re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+)$", text, re.M)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert dockerignore_allows(src), f"COPY {src}: excluded by .dockerignore"
    for module in re.findall(r"import ([\w., ]+);", text)[0].split(","):
        name = module.strip()
        if name.startswith("headrace."):
            parts = name.split(".")[1:]
            assert (ROOT / Path(*parts)).with_suffix(".py").is_file(), name
    assert all(f.split()[1] in ("${RAY_IMAGE}",) for f in re.findall(r"^FROM .+$", text, re.M))
    assert ray_image().startswith("rayproject/ray:")


def test_ray_up_config_passes_rays_validation() -> None:
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler._private.util import validate_config as validate_cluster

    cfg = load(DEPLOY / "ray-up" / "cluster.yaml")
    validate_cluster(prepare_config(cfg))
    docker = cfg["docker"]
    assert docker["image"] == image_name()
    assert f"--env {REDIS_ENV}" in docker["run_options"]
    assert any(o.startswith("--volume ") and o.split(":")[1] == model_mount() for o in docker["run_options"])
    bad = dict(cfg, dockr=cfg["docker"])
    with pytest.raises(Exception, match="dockr"):
        validate_cluster(prepare_config(bad))


def test_operations_guide_names_the_artifacts() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for path in ("deploy/Dockerfile", "deploy/kuberay/rayservice.yaml", "deploy/kuberay/model-repo-pvc.yaml",
                 "deploy/serve_config.yaml", "deploy/ray-up/cluster.yaml"):
        assert path in doc, path
