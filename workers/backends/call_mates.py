"""Does a request's answer depend on the other requests of its model call?

It must not: batching is only an optimisation. A model that computes across the batch axis
(a softmax or a mean over the batch, batch normalisation with batch statistics, attention
across samples) answers each request with values made from its call-mates' inputs, which is
both wrong and a leak of their data. The graph cannot always tell (an output that keeps the
batch axis can still mix rows), so ``headrace models add`` runs the check below on the
example and serves such a model one request per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from headrace.client.protocol import Request
from headrace.workers.backends.base import Servable

Array = np.ndarray[Any, Any]

#: A float output whose value for a request moves by more than this share of the output's
#: scale when the request runs alone is taken to mix rows. Far above the noise of batched
#: kernels and of dynamic INT8 quantisation (activation scales over the whole call: ~1 %),
#: far below what mixing two random rows does (the order of the values themselves).
MIXING_SHARE = 0.1

#: Most requests of the example run alone (each is a model call of its own).
MAX_ALONE = 8


def can_judge(requests: Sequence[Request]) -> bool:
    """Whether the check can tell anything from ``requests``: two or more of its first
    :data:`MAX_ALONE`, not all alike (alike requests give the same answers alone or together,
    mixing or not)."""
    requests = requests[:MAX_ALONE]
    if len(requests) < 2:
        return False
    first = requests[0].inputs
    return any(any(not np.array_equal(np.asarray(r.inputs[k]), np.asarray(v)) for k, v in first.items())
               for r in requests[1:])


def outputs_moved_by_call_mates(servable: Servable, requests: Sequence[Request],
                                batched: Sequence[Mapping[str, Array]]) -> list[str]:
    """The float outputs whose values for some request of ``requests`` differ, run alone,
    from ``batched`` (their results run as one call) by more than :data:`MIXING_SHARE` of
    the output's scale, and any output whose shape for a request differs alone. Integer and
    boolean values are not judged (a label can flip on a near tie). The first
    :data:`MAX_ALONE` requests run alone. Empty when fewer than two distinct requests make
    the check impossible.

    Raises:
        ModelError (and whatever ``servable.infer`` raises): a request fails alone.
    """
    requests, batched = requests[:MAX_ALONE], batched[:MAX_ALONE]
    if not can_judge(requests):
        return []
    moved: list[str] = []
    alone = [servable.infer([r])[0] for r in requests]
    for name in batched[0]:
        pairs = [(np.asarray(b[name]), np.asarray(a[name])) for b, a in zip(batched, alone, strict=True)]
        if any(b.shape != a.shape for b, a in pairs):
            # A shape that changes with the call-mates (padded to the longest request of the
            # call, say) is theirs to decide, whatever the dtype: no near tie explains it.
            moved.append(name)
            continue
        if pairs[0][0].dtype.kind != "f":
            continue
        scale = max(float(np.max(np.abs(x), initial=0.0)) for pair in pairs for x in pair)
        worst = max(float(np.max(np.abs(b.astype(np.float64) - a.astype(np.float64)), initial=0.0))
                    for b, a in pairs)
        if worst > MIXING_SHARE * scale + 1e-6:
            moved.append(name)
    return moved
