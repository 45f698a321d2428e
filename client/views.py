"""What :class:`~headrace.client.Client` and :class:`~headrace.client.aio.AsyncClient` show
of the :class:`~headrace.client.core.ClientCore` they share: the retry policy, the reader's
reconnects, and key names. Neither twin does I/O here, so one mixin serves both."""

from __future__ import annotations

from typing import Any

from headrace.client.core import ClientCore
from headrace.client.forks import PerProcess
from headrace.client.keys import ModelKeys
from headrace.client.retry import Retry


class CoreViews:
    """Read-only views of ``self._core``, the core of this process (``self._proc`` is set by
    the client's constructor; a forked child gets its own, see :mod:`headrace.client.forks`)."""

    _proc: PerProcess[Any]

    @property
    def _core(self) -> ClientCore:
        return self._proc.current()[0]

    @property
    def client_id(self) -> str:
        """Names this client's reply streams (a new one in each forked child process)."""
        return self._core.client_id

    @property
    def retry(self) -> Retry:
        """The default retry policy of this client's calls."""
        return self._core.retry

    @property
    def reconnects(self) -> int:
        """How often the reply reader lost Redis and reconnected."""
        return self._core.reconnects

    @property
    def _reader_conn_id(self) -> int | None:
        return self._core.reader_conn_id

    def model_keys(self, model: str) -> ModelKeys:
        """Key names of ``model`` in this client's namespace.

        Raises:
            ConfigError: an invalid model name.
        """
        return self._core.model_keys(model)

    def reply_stream(self, model: str) -> str:
        """The reply stream this client reads for ``model``."""
        return self._core.reply_stream(model)
