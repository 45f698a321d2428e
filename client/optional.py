"""Optional dependencies: import one, or fail with the pip command that installs it.

headrace ships one distribution with extras by role (``pyproject.toml``,
``[project.optional-dependencies]``; the README's install section lists them). The base
install is this SDK; every heavier import (onnxruntime, torch, ray, ...) happens where a
role needs it, through :func:`require`, so that a missing extra reads as::

    [config_error] headrace compress needs torch, which is not installed (No module named 'torch');
    pip install "headrace[compress]"

instead of a bare ``ModuleNotFoundError`` from deep inside a call.

The extra names are part of the public install interface; :data:`WORKER` names the two
mutually exclusive ONNX Runtime flavours (``onnxruntime`` and ``onnxruntime-gpu`` ship the
same ``onnxruntime`` module and must never be installed together).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Final

from headrace.client.errors import ConfigError

DISTRIBUTION: Final = "headrace"
# The ONNX Runtime flavours: exactly one of them per environment.
WORKER: Final = ("worker-cpu", "worker-gpu")


class MissingDependencyError(ConfigError):
    """Raised when an optional dependency of a role is not installed (or cannot be imported).

    Code ``config_error``: the environment, not a request, is at fault, and a request never
    carries this error on the wire. ``module`` is the import that failed, ``extras`` the
    extras of which any one provides it, ``install`` the pip command to run.
    """

    def __init__(self, module: str, extras: Sequence[str], cause: BaseException, *, purpose: str = "") -> None:
        self.module = module
        self.extras = tuple(extras)
        self.install = install_command(self.extras)
        missing = isinstance(cause, ModuleNotFoundError) and _is_part_of(cause.name, module)
        state = "is not installed" if missing else "cannot be imported"
        who = f"{purpose} needs {module}, which" if purpose else module
        super().__init__(f"{who} {state} ({cause}); {self.install}")


def install_command(extras: str | Sequence[str]) -> str:
    """``pip install "headrace[x]"`` for one extra, alternatives joined with "or"."""
    names = (extras,) if isinstance(extras, str) else tuple(extras)
    if not names:
        raise ValueError("install_command needs at least one extra")
    cmds = [f'"{DISTRIBUTION}[{n}]"' for n in names]
    return "pip install " + cmds[0] + "".join(f" (or {c})" for c in cmds[1:])


def require(module: str, extra: str | Sequence[str], *, purpose: str = "") -> ModuleType:
    """Import ``module`` (dotted names allowed: ``"ray.serve"``) and return it.

    Args:
        module: the module to import.
        extra: the extra that installs it, or several alternatives (e.g. :data:`WORKER`).
        purpose: who needs it, for the message (e.g. ``"headrace compress"``).

    Raises:
        MissingDependencyError: the import failed; the message names the extra to install,
            and the original ``ImportError`` is chained (a module that is installed but
            broken, e.g. a missing shared library, says "cannot be imported").
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extras = (extra,) if isinstance(extra, str) else tuple(extra)
        raise MissingDependencyError(module, extras, e, purpose=purpose) from e


def require_all(modules: Mapping[str, str | Sequence[str]], *, purpose: str = "") -> None:
    """:func:`require` each of ``modules`` (module -> extra), in order: the first missing one
    raises, so list the module whose extra brings the others first.

    Raises:
        MissingDependencyError: as :func:`require`.
    """
    for module, extra in modules.items():
        require(module, extra, purpose=purpose)


def _is_part_of(name: str | None, module: str) -> bool:
    """Whether the module that was not found is ``module`` or one of its parents."""
    if not name:
        return False
    return module == name or module.startswith(name + ".")
