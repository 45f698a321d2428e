"""A standalone worker for benchmarks: the ordinary worker loop, with the servable and
the probes a benchmark asks for.

    python -m benchmarks.lib.bench_worker [--standin RUN] [--curve FILE] [--probe-out FILE] \\
        [the flags of python -m headrace.workers]

* ``--standin RUN``: serve the accelerator stand-in (:mod:`benchmarks.lib.standin`, a
  SIMULATION) with the curve ``RUN`` (e.g. ``cuda fp16``) of ``--curve`` (default the
  H100 run in ``benchmarks/results``); its ``max_batch`` follows ``--max-batch``.
* else ``--fake affine|length`` serves a numpy fake, and neither loads the model
  repository entry as ``python -m headrace.workers`` does.
* ``--probe-out FILE`` (or ``$HEADRACE_PROBE_OUT``): wrap broker and servable with the
  timing probes of :mod:`benchmarks.lib.probe`, written to FILE on exit.

Runs until SIGTERM (graceful drain), like ``python -m headrace.workers``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from headrace.client.errors import HeadraceError
from headrace.workers.backends.base import Servable
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Any]:
    """(this module's options, the worker's options: :func:`headrace.workers.cli.parse_args`)."""
    from headrace.workers.cli import parse_args

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--standin", default="", help="serve the accelerator stand-in with this curve run")
    ap.add_argument("--curve", default="", help="gpu_torch.py JSON report holding the curve")
    ap.add_argument("--probe-out", default=os.environ.get("HEADRACE_PROBE_OUT", ""))
    own, rest = ap.parse_known_args(argv)
    return own, parse_args(rest)


def make_servable(own: argparse.Namespace, args: Any, settings: WorkerSettings) -> Servable:
    """The servable the options name (see module doc).

    Raises:
        ConfigError / ModelError / RepositoryError: it cannot be built.
    """
    if own.standin:
        from benchmarks.lib.standin import make_standin

        return make_standin(own.standin, own.curve, settings.max_batch, name=settings.model)
    if args.fake:
        from headrace.workers.backends.fake import fake_from_env

        return fake_from_env(args.fake, name=settings.model, reject_non_finite=settings.reject_non_finite)
    from headrace.workers.backends import load_servable

    return load_servable(settings)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    from headrace.workers.cli import settings_from_args
    from headrace.workers.run import run_standalone, serve

    own, args = parse(argv)
    level = (args.log_level or os.environ.get("HEADRACE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is None and own.standin:
        args.model = "minilm-standin"
    try:
        settings = settings_from_args(args)
        servable = make_servable(own, args, settings)
        if not own.probe_out:
            run_standalone(settings, servable)
            return 0
        from benchmarks.lib.probe import ProbeBroker, Probes, ProbeServable
        from headrace.workers.engine.heap import freeze_startup_heap

        if settings.gc_freeze:  # as run_standalone does
            freeze_startup_heap()

        probes = Probes()
        probed = ProbeServable(servable, probes)
        try:
            asyncio.run(serve(settings, probed, broker=ProbeBroker(settings, probes)))
        finally:
            probed.close()
        log.info("wrote %d probes to %s", probes.dump(own.probe_out), own.probe_out)
    except HeadraceError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
