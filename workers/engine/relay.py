"""The relay task of a worker: move the model's inbox into its request stream.

In strict submit mode producers may only append to ``<ns>:{<model>}:inbox`` (the submit
function does it for them); every worker of the model runs this task, which waits for the
inbox (``Broker.wait_inbox``: a wait that leaves the element in place) and moves up to
``relay_batch`` elements at a time into the stream with one atomic ``headrace_relay`` call
(``Broker.wait_and_relay``: on a single Redis the wait and the first call of a wake-up go in
one round trip).
A worker that dies at any point leaves every element either in the inbox, for the other
workers' relays, or in the stream, never in both and never nowhere. Workers in direct mode
run it too, so requests of producers without the XADD grant are still served.
"""

from __future__ import annotations

import logging

from headrace.client import errors as E
from headrace.workers.broker.base import RelayStep
from headrace.workers.engine.state import Shared

log = logging.getLogger(__name__)


class Relay:
    """The relay task of one worker (see module doc)."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    async def relay_loop(self) -> None:
        """Relay until the worker stops; Redis outages back off and resume."""
        s = self.shared
        backoff = s.control.backoff("inbox relay")
        step: RelayStep | None = None
        while not (s.control.stopping or s.control.shutdown):
            try:
                if step is not None and step.left == 0:  # drained: wait, and relay what comes
                    step = await s.broker.wait_and_relay(s.settings.relay_batch, s.settings.block_ms)
                else:
                    step = await s.broker.relay(s.settings.relay_batch)
                if step.moved:
                    s.counters["relayed"] += step.added
                    if step.dead_lettered:
                        s.counters["relay_dead_lettered"] += step.dead_lettered
                        log.warning("%d inbox elements broke the entry bounds; dead-lettered without their payload",
                                    step.dead_lettered)
                backoff.ok()
            except E.BrokerError as e:
                step = None
                await backoff.wait(e)
