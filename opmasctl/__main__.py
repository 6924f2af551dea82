# PYTHON_ARGCOMPLETE_OK
"""Entry point of the `opmasctl` console script and of `python -m opmasctl`."""

from __future__ import annotations

import sys

from opmasctl.cli import run


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
