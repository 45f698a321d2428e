"""`headrace redis` never leaves its redis-server behind (issue #10): SIGTERM, SIGHUP and
Ctrl-C stop it, and on Linux even a SIGKILL of the command takes the server down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.polling import poll_until

pytestmark = pytest.mark.timeout(60)
EXE = str(Path(sys.executable).with_name("headrace"))


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def started(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`headrace redis` as a process, and the pid of the redis-server it started."""
    cmd = subprocess.Popen([EXE, "redis", "--data-dir", str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert cmd.stdout is not None
    url = cmd.stdout.readline().strip()
    assert url.startswith("redis://127.0.0.1:"), cmd.stderr.read() if cmd.stderr else ""
    r = redis.Redis.from_url(url)
    server_pid = int(r.info("server")["process_id"])
    r.close()
    yield cmd, server_pid
    if cmd.poll() is None:
        cmd.kill()
        cmd.wait(10)
    if _alive(server_pid):  # the test failed: do not leave it behind either
        os.kill(server_pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_termination_signal_stops_the_server_too(started: tuple[subprocess.Popen[str], int], sig: int) -> None:
    cmd, server_pid = started
    assert _alive(server_pid)
    cmd.send_signal(sig)
    assert cmd.wait(20) == 0
    assert cmd.stderr is not None and "stopping redis-server" in cmd.stderr.read()
    poll_until(lambda: not _alive(server_pid), 10, 0.05, what="redis-server gone")


def test_sigint_stops_it_even_when_started_with_sigint_ignored(tmp_path: Path) -> None:
    """A command started in the background of a script inherits SIGINT ignored (and Python
    then raises no KeyboardInterrupt): an explicit SIGINT still stops it and its server."""
    cmd = subprocess.Popen([EXE, "redis", "--data-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    try:
        assert cmd.stdout is not None
        url = cmd.stdout.readline().strip()
        r = redis.Redis.from_url(url)
        server_pid = int(r.info("server")["process_id"])
        r.close()
        cmd.send_signal(signal.SIGINT)
        assert cmd.wait(20) == 0
        poll_until(lambda: not _alive(server_pid), 10, 0.05, what="redis-server gone")
    finally:
        if cmd.poll() is None:
            cmd.kill()
            cmd.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sigkill_of_the_command_takes_the_server_down(started: tuple[subprocess.Popen[str], int]) -> None:
    cmd, server_pid = started
    cmd.kill()
    cmd.wait(10)
    poll_until(lambda: not _alive(server_pid), 10, 0.05, what="redis-server gone")


def test_a_server_started_for_another_process_outlives_it_when_asked(tmp_path: Path) -> None:
    """EmbeddedRedis without die_with_parent (``headrace up`` detaches its Redis): the server
    keeps running after its starter exits."""
    code = ("from headrace.cluster.ops.embedded_redis import EmbeddedRedis\n"
            f"s = EmbeddedRedis(data_dir={str(tmp_path)!r}).start()\n"
            "print(s.url, s.proc.pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    url, pid = out.stdout.split()
    try:
        time.sleep(0.3)
        assert _alive(int(pid)) and redis.Redis.from_url(url).ping()
    finally:
        os.kill(int(pid), signal.SIGKILL)
