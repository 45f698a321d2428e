"""Build headrace's wheel and sdist and install them into clean virtualenvs, fast.

Used by tests/integration/test_install.py. What makes a dozen virtualenvs affordable:

* :func:`build_dists` builds with ``python -m build --no-isolation`` (the dev environment
  has setuptools): the sdist first, then the wheel *from the unpacked sdist*, so a wheel
  that installs and works also proves the sdist is complete.
* :func:`wheelhouse` downloads, once, every distribution the tested roles need into
  ``.cache/install-wheelhouse/<key>``, with pip (it honours this machine's pip
  configuration and reuses pip's cache; a cold cache only makes it slower) and pinned to
  the versions installed in the dev environment, so the roles are tested against what CI
  tests. The key covers those pins and the wheel's requirements.
* :class:`Venv` creates virtualenvs and installs into them with uv, offline from the
  wheelhouse: uv links files from its own cache instead of unpacking every wheel again.
* A stub distribution named ``torch`` (:func:`stub_torch_wheel`) stands for a user's own
  torch build, so "your torch stays" is checked without downloading a real one.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "install-wheelhouse"
STUB_TORCH_VERSION = "2.5.1+cu121"  # looks like a user's CUDA build; meets the [torch] bound
CLEAN_ENV_DROP = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak the dev venv into a child, and
    without ``HEADRACE_*`` settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEADRACE_", *CLEAN_ENV_DROP)) and k not in CLEAN_ENV_DROP}
    env.update(extra)
    return env


def run(cmd: list[str], *, timeout_s: float, cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure (with ``check``) raise with its output in the message."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
                         env=env if env is not None else clean_env())
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}"
                             f"\n--- stderr\n{res.stderr[-4000:]}")
    return res


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path


def build_dists(out: Path) -> Dists:
    """sdist, then the wheel built from it, into ``out``."""
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], timeout_s=180)
    wheels, sdists = sorted(out.glob("headrace-*.whl")), sorted(out.glob("headrace-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return Dists(wheels[0], sdists[0])


def stub_torch_wheel(folder: Path, version: str = STUB_TORCH_VERSION) -> Path:
    """A tiny wheel of a distribution named ``torch`` whose module only has ``__version__``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": f'__version__ = "{version}"\n',
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: headrace-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"torch-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            data = text.encode()
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        z.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return path


def dev_pins(stub_torch: str = STUB_TORCH_VERSION) -> str:
    """``name==version`` of every distribution in the dev environment (torch: the stub's)."""
    lines = {}
    for d in md.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name and name not in ("headrace", "torch"):
            lines[name] = f"{name}=={d.version}"
    lines["torch"] = f"torch=={stub_torch}"
    return "\n".join(sorted(lines.values())) + "\n"


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return sorted(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:"))


def wheelhouse(dists: Dists, extras: str, stub_dir: Path) -> Path:
    """Every wheel that ``headrace[extras]`` and an sdist build need, in a cached folder."""
    pins = dev_pins()
    key = hashlib.sha256(json.dumps([pins, wheel_requirements(dists.wheel), extras]).encode()).hexdigest()[:16]
    folder = CACHE / key
    if (folder / ".complete").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.iterdir():  # one wheelhouse at a time: they are ~200 MB each
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    (CACHE / f"{key}.pins.txt").write_text(pins)
    setuptools = Requirement(f"setuptools=={md.version('setuptools')}")
    run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d", str(folder),
         "-c", str(CACHE / f"{key}.pins.txt"), "--find-links", str(stub_dir),
         f"headrace[{extras}] @ {dists.wheel.as_uri()}", str(setuptools)], timeout_s=900)
    for own in folder.glob("headrace-*"):
        own.unlink()
    (CACHE / f"{key}.pins.txt").unlink()
    (folder / ".complete").write_text(pins)
    return folder


class Venv:
    """A clean virtualenv (no pip inside: uv or an outside pip installs into it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        run([sys.executable, "-m", "uv", "venv", "-q", "--no-config", "--python", sys.executable, str(path)],
            timeout_s=60)
        self.python = path / "bin" / "python"

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def install(self, *reqs: str, find_links: Path | None = None, timeout_s: float = 300) -> None:
        """uv pip install, offline, from ``find_links`` only."""
        cmd = [sys.executable, "-m", "uv", "pip", "install", "-q", "--no-config", "--offline", "--no-index",
               "--python", str(self.python)]
        if find_links is not None:
            cmd += ["--find-links", str(find_links)]
        run([*cmd, *reqs], timeout_s=timeout_s)

    def py(self, code: str, *args: str, timeout_s: float = 120, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``code`` with this venv's python, from a folder outside the repository (so the
        checkout's top-level packages are never importable by accident)."""
        return run([str(self.python), "-c", code, *args], timeout_s=timeout_s, cwd=self.path,
                   env=env if env is not None else clean_env(), check=check)

    def importable(self, *modules: str) -> dict[str, bool]:
        code = ("import importlib.util, json, sys\n"
                "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
        return dict(json.loads(self.py(code, *modules).stdout))

    def version(self, dist: str) -> str | None:
        code = ("import importlib.metadata as md, sys\n"
                "try:\n    print(md.version(sys.argv[1]))\nexcept md.PackageNotFoundError:\n    print('')")
        return self.py(code, dist).stdout.strip() or None
