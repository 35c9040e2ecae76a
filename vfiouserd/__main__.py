"""The program: ``python -m vfiouserd`` and the ``vfiouserd`` commands
(pyproject's scripts, the vhost-user descriptors' program links)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vfiouserd import module_code


def main(argv: Sequence[str] | None = None) -> int:
    # First of all, so that even the next imports come from it: until the
    # jail, modules' code without docstrings (see vfiouserd.module_code).
    module_code.start()
    from vfiouserd import generated_code, startup

    # Before trio and construct are imported (see vfiouserd.startup).
    generated_code.start()  # until the jail: see vfiouserd.generated_code
    with startup.as_the_program():
        from vfiouserd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
