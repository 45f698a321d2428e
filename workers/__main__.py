"""``python -m headrace.workers``: one standalone stream worker.

Settings come from ``HEADRACE_*`` environment variables; the flags below override them.
``--fake affine|length`` serves a numpy fake (see ``workers/backends/fake.py``) instead of a
repository model, for tests and chaos runs; the model name then defaults to the fake's kind.
The user-facing command is ``headrace worker``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from headrace.client.errors import HeadraceError
from headrace.workers.settings import WorkerSettings

_FLAGS: tuple[tuple[str, type], ...] = (
    ("model", str), ("version", str), ("redis_url", str), ("namespace", str), ("group", str),
    ("consumer", str), ("model_repo", str), ("backend", str), ("max_batch", int), ("preferred_batch", int),
    ("max_wait_ms", float), ("block_ms", int), ("lease_s", float), ("max_deliveries", int),
    ("dedupe_ttl_s", int), ("reply_ttl_s", int), ("trim_interval_s", float), ("drain_timeout_s", float),
    ("infer_timeout_s", float), ("metrics_port", int), ("instances", int), ("intra_op_threads", int), ("servable", str),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m headrace.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake", choices=("affine", "length"), help="serve a numpy fake servable")
    for name, typ in _FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"overrides HEADRACE_{name.upper()}")
    p.add_argument("--log-level", default=os.environ.get("HEADRACE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    overrides = {name: getattr(args, name) for name, _ in _FLAGS}
    if args.fake and overrides["model"] is None and "HEADRACE_MODEL" not in os.environ:
        overrides["model"] = args.fake
    try:
        settings = WorkerSettings.from_env(**overrides)
        servable = None
        if args.fake:
            from headrace.workers.backends.fake import fake_from_env

            servable = fake_from_env(args.fake, name=settings.model, reject_non_finite=settings.reject_non_finite)
        from headrace.workers.run import run_standalone

        run_standalone(settings, servable)
    except HeadraceError as e:
        logging.getLogger("headrace.workers").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
