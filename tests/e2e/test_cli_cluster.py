"""``headrace up | scale | deploy | status | down`` against a real local Ray head node with
its dashboard (the REST path ``serve deploy`` uses), Redis embedded by ``up``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from headrace.cluster.ops.embedded_redis import free_ports

pytestmark = pytest.mark.timeout(420)

HEADRACE = str(Path(sys.executable).with_name("headrace"))


def _run(args: list[str], env: dict[str, str], timeout_s: float = 300.0) -> str:
    proc = subprocess.run([HEADRACE, *args], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"headrace {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_scale_deploy_status_down(tmp_path: Path) -> None:
    http_port, dashboard_port = free_ports(2)
    config = tmp_path / "ray_config.yaml"
    config.write_text(f"""
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {http_port}}}
applications:
  - name: affine
    route_prefix: null
    import_path: headrace.cluster.serve.app:build_app
    args: {{model: affine, fake: affine, num_replicas: 1, num_cpus: 0.25, drain_timeout_s: 10}}
  - name: http
    route_prefix: /
    import_path: headrace.cluster.serve.app:build_ingress
    args: {{timeout_s: 20}}
""")
    env = {**os.environ, "HEADRACE_STATE_DIR": str(tmp_path / "state")}
    env.pop("HEADRACE_REDIS_URL", None)
    env.pop("RAY_DASHBOARD_ADDRESS", None)
    state_file = tmp_path / "state" / "cluster.json"
    try:
        out = _run(["up", "--config", str(config), "--num-cpus", "2", "--dashboard-port", str(dashboard_port),
                    "--no-build"], env)
        state = json.loads(state_file.read_text())
        assert f"Ray dashboard: {state['dashboard_url']}" in out
        assert state["redis_pid"] and _alive(state["redis_pid"]) and _alive(state["ray_pid"])
        env["HEADRACE_REDIS_URL"] = state["redis_url"]

        assert "affine: 2 replica(s) running" in _run(["scale", "affine", "2"], env)
        status = _run(["status"], {**env, "COLUMNS": "200"})
        rows = [ln for ln in status.splitlines() if ln.startswith("│ affine") and "RUNNING" in ln]
        assert "Ray Serve replicas" in status and len(rows) == 2, status

        assert "rolled out version 3" in _run(["deploy", "affine", "--version", "3"], env)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as http:
            res = http.post("/v1/models/affine/infer", json={"inputs": {"x": [1, 2, 3, 4]}})
        assert res.status_code == 200, res.text
        assert res.json()["version"] == "3" and res.json()["outputs"]["y"]["data"] == [3.0, 5.0, 7.0, 9.0]
        r = redis.Redis.from_url(state["redis_url"])
        assert r.hexists("headrace:models", "affine")
        r.close()
    finally:
        if state_file.exists():
            down = subprocess.run([HEADRACE, "down"], env=env, capture_output=True, text=True, timeout=180)
            assert down.returncode == 0, down.stderr
    assert not state_file.exists()
    assert not _alive(state["redis_pid"])
    assert not _alive(state["ray_pid"])
