"""Types that check: ``headrace.*`` resolves to the real classes (never ``Any``) for mypy and
pyright, both in the repository's own run and for an application outside it that uses the
editable install; wrong cross-package calls are reported."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Each line marked "# error" must be reported, and only those.
SNIPPET = '''\
import headrace.client
from headrace.client import Client, Result
from headrace.workers.settings import WorkerSettings

reveal_type(headrace.client.Client)
c = Client("redis://127.0.0.1:6379/0")
c.map("affine", [1, 2, 3])  # error
c.infer("affine", text=5)  # error
WorkerSettings(max_batch="32")  # error
res: Result = c.infer("minilm", text="a sentence")
bad_status: int = res.status  # error
ok_status: str = res.status
items = c.map("minilm", ["a", "b"], progress=lambda done, total: None)
'''
EXPECTED = sorted(i + 1 for i, line in enumerate(SNIPPET.splitlines()) if line.endswith("# error"))


def _app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "app.py"
    path.write_text(SNIPPET, encoding="utf-8")
    return path


def _mypy(app: Path, cwd: Path, *extra: str) -> tuple[list[int], str]:
    proc = subprocess.run([str(BIN / "mypy"), "--cache-dir", str(ROOT / ".cache" / "mypy-typing-test"),
                           "--no-error-summary", "--show-error-codes", *extra, str(app)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    errors = sorted({int(m) for m in re.findall(rf"^{re.escape(str(app))}:(\d+): error", out, re.M)})
    return errors, out


@pytest.mark.timeout(900)
def test_mypy_resolves_headrace_in_the_repository_and_in_an_application(tmp_path: Path) -> None:
    # The repository's own configuration (pyproject.toml, run from the root as `make lint` does).
    inside = _app(ROOT / ".cache" / "typing-app")
    errors, out = _mypy(inside.relative_to(ROOT), ROOT)
    assert 'Revealed type is "def' in out and "headrace.client.client.Client" in out, out
    assert 'Revealed type is "Any"' not in out, out
    assert errors == EXPECTED, out
    assert "Cannot find implementation or library stub" not in out, out
    # An application elsewhere, no configuration: headrace comes from the editable install.
    outside = _app(tmp_path / "app")
    errors, out = _mypy(Path(outside.name), outside.parent)
    assert "headrace.client.client.Client" in out and errors == EXPECTED, out


@pytest.mark.timeout(600)
def test_pyright_resolves_headrace_in_an_application(tmp_path: Path) -> None:
    pyright = shutil.which("pyright", path=str(BIN)) or shutil.which("pyright")
    assert pyright, "pyright is part of the dev extra: pip install -e '.[dev]'"
    app = _app(tmp_path / "app")
    proc = subprocess.run([pyright, "--pythonpath", sys.executable, str(app)], cwd=app.parent,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert 'Type of "headrace.client.Client" is "type[Client]"' in out, out
    errors = sorted({int(m) for m in re.findall(rf"{re.escape(str(app))}:(\d+):\d+ - error", out)})
    assert errors == EXPECTED, out
    assert "reportMissingImports" not in out and "could not be resolved" not in out, out
