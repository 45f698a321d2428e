"""Progress reporting of ``map``/``imap``: a tqdm bar on a terminal, a callback, or nothing.

``progress=None`` (the default) shows a bar only when stderr is a terminal (tqdm's
``disable=None``), so logs of batch jobs stay clean; ``True`` forces it, ``False`` turns it
off, and a callable ``fn(done, total)`` is called instead (``total`` None when unknown).

The bar is advanced once per burst of results (a worker answers a batch at once), shows up
after half a second, and its rate is smoothed over many updates: its first estimate is based
on many results rather than on the very first one, which alone says little about the rate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, "int | None"], None]
ProgressOption = bool | None | ProgressCallback
"""What ``map``'s ``progress`` accepts (see the module doc)."""


class Progress(Protocol):
    """Where ``map`` reports: ``update(n)`` per burst of ``n`` results, ``close()`` at the end."""

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class _Callback:
    def __init__(self, fn: ProgressCallback, total: int | None) -> None:
        self.fn, self.total, self.done = fn, total, 0

    def update(self, n: int) -> None:
        self.done += n
        try:
            self.fn(self.done, self.total)
        except Exception:  # noqa: BLE001 - a progress callback must not break the map
            log.warning("progress callback failed", exc_info=True)

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int | None, desc: str, force: bool) -> None:
        from tqdm.auto import tqdm

        # disable=None: tqdm turns itself off when stderr is not a terminal. delay: the bar
        # (and its first ETA) appears after half a second of results, not after the first
        # one; smoothing: a rate averaged over many updates, so one burst does not set it.
        self.bar: Any = tqdm(total=total, desc=desc, unit="req", disable=False if force else None,
                             smoothing=0.05, mininterval=0.2, delay=0.0 if force else 0.5, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Null:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(option: ProgressOption, total: int | None, desc: str) -> Progress:
    """The :class:`Progress` for a ``progress=`` argument.

    Raises:
        TypeError: ``option`` is neither a bool, None nor a callable.
    """
    if option is False:
        return _Null()
    if option is None or option is True:
        return _Bar(total, desc, force=option is True)
    if callable(option):
        return _Callback(option, total)
    raise TypeError(f"progress must be None, a bool or a callable(done, total), got {type(option).__name__}")
