# PYTHON_ARGCOMPLETE_OK
"""Entry point of the `opmasctl` console script and of `python -m opmasctl`."""

from __future__ import annotations

import os
import sys


def main() -> None:
    # gRPC's C core would print its own view of a failed connection on stderr (a TLS handshake
    # with a plaintext port, an address it cannot parse), source locations and all; opmasctl
    # says what went wrong itself. Set before grpc is first imported, which reads it then.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from opmasctl.cli import run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
