"""Clients across ``os.fork()``: each process gets its own client state.

A forked child inherits a copy of its parent's clients: their reply-stream name (the client
id), their connections (sockets shared with the parent), a reader thread object whose
thread does not exist in the child, and a book of the parent's outstanding tickets. Used as
is, the child's calls wait for results nobody reads, or the children of one client read and
delete each other's results from the one stream they share. So, like redis-py's connection
pool (its pid check) and ``concurrent.futures`` (``os.register_at_fork``), a client notices
on its first use in a new process and starts over there: a new client id, new connections,
a new reader, an empty ticket book. Tickets made before the fork stay with the parent.

The check is a fork *generation* counter bumped by an ``os.register_at_fork`` hook: reading
a module global costs far less than ``os.getpid()`` (a system call) on every call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

from headrace.client import errors as E
from headrace.client.submit import new_client_id

if TYPE_CHECKING:
    from headrace.client.core import ClientCore
    from headrace.client.tickets import Ticket

log = logging.getLogger(__name__)
IO = TypeVar("IO")

_generation = 0
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A new process: state bound to the old one is stale. The lock is replaced too: a thread
    # of the parent may have held it at the fork, and that thread does not exist here.
    global _generation, _lock
    _generation += 1
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def generation() -> int:
    """How many forks separate this process from the one that imported headrace (0 there)."""
    return _generation


def check_owner(born: int, request_id: str) -> None:
    """Refuse to wait for a ticket made in another process (before a fork).

    Raises:
        HeadraceError: the ticket was made by an ancestor process; no reader here will
            ever deliver its result.
    """
    if born != _generation:
        raise E.HeadraceError(
            f"request {request_id} was submitted before this process was forked (now pid {os.getpid()}); its result "
            "goes to the parent's client and cannot be collected here: collect it in the parent, or submit it again "
            "from this process")


def check_owners(tickets: Iterable[Ticket]) -> None:
    """:func:`check_owner` for each pending ticket of ``tickets`` (done ones hold their outcome).

    Raises:
        HeadraceError: one of them was made before this process forked.
    """
    for t in tickets:
        if not t.done():
            check_owner(t._born, t.request_id)


class PerProcess(Generic[IO]):
    """A client's core and IO shell for the current process: rebuilt, with a new client id,
    the first time they are asked for in a forked child.

    Args:
        core: the client's core in this process.
        make_io: builds the IO shell (connections, reader) of a core.
    """

    def __init__(self, core: ClientCore, make_io: Callable[[ClientCore], IO]) -> None:
        self._make_io = make_io
        self.core = core
        self.io = make_io(core)
        self._born = _generation

    def current(self) -> tuple[ClientCore, IO]:
        """The core and IO shell of this process (new ones in a forked child)."""
        if self._born != _generation:
            self._rebuild()
        return self.core, self.io

    def _rebuild(self) -> None:
        with _lock:
            if self._born == _generation:
                return  # another thread of this process did it
            old = self.core
            core = type(old)(old.settings, new_client_id(), old.retry)
            core.closed = old.closed  # a client closed before the fork stays closed
            # The old IO shell is dropped without closing it: closing would disconnect or
            # delete what belongs to the parent (redis-py's own pid check keeps its pools
            # from using the parent's sockets). The parent's tickets stay in its book.
            self.io = self._make_io(core)
            self.core = core
            self._born = _generation  # last: other threads check it without the lock
            log.debug("client %s forked: process %d uses client id %s", old.client_id, os.getpid(), core.client_id)
