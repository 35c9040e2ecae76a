"""The program: ``python -m vfiouserd`` and the ``vfiouserd`` commands
(pyproject's scripts, the vhost-user descriptors' program links)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vfiouserd import generated_code, startup


def main(argv: Sequence[str] | None = None) -> int:
    # First, before trio and construct are imported (see vfiouserd.startup).
    generated_code.start()  # until the jail: see vfiouserd.generated_code
    startup.defer()
    with startup.known_libraries():
        from vfiouserd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
