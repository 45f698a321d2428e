"""``python -m headrace.workers``: one standalone stream worker.

The same command as ``headrace worker`` (:mod:`headrace.workers.cli`): options derived from
the worker settings, each falling back to its ``HEADRACE_*`` variable. ``--fake
affine|length`` serves a numpy fake (``workers/backends/fake.py``) instead of a repository
model, for tests and chaos runs. Exit status: 0 after a graceful stop, 2 when the worker
failed or the arguments are invalid.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import click

from headrace.client.errors import HeadraceError
from headrace.workers.cli import PROG, worker


def main(argv: Sequence[str] | None = None) -> int:
    level = os.environ.get("HEADRACE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level if level in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"} else "INFO",
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    try:
        worker.main(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROG, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Exit as e:  # --help
        return int(e.exit_code)
    except click.Abort:
        return 1
    except HeadraceError as e:
        logging.getLogger("headrace.workers").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
