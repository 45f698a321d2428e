"""Fake-model worker processes for the integration and chaos tiers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class WorkerProc:
    """One ``python -m headrace.workers --fake <fake>`` child; stdout and stderr go to
    ``log_path``. Its environment is the caller's without any ``HEADRACE_*`` variable, plus
    ``env``. ``name`` is only a label (pass ``--consumer`` in ``args`` to name the consumer)."""

    def __init__(self, url: str, log_path: Path, *args: str, fake: str = "affine",
                 env: dict[str, str] | None = None, name: str = "") -> None:
        self.name = name
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
        full_env.update(env or {})
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        cmd = [sys.executable, "-m", "headrace.workers", "--fake", fake, "--redis-url", url, *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        """The exit code, waiting up to ``timeout_s`` (``subprocess.TimeoutExpired`` after)."""
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
