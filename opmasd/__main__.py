"""`opmasd`: run the daemon in the foreground (systemd, or `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import structlog

from opmasd import __version__
from opmasd.config import ConfigError, load_config
from opmasd.logging import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line (also the source of its man page, scripts/gen_man.py)."""
    parser = argparse.ArgumentParser(prog="opmasd", description="OPMAS agent manager daemon")
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("OPMAS_CONFIG") or None,
        help="YAML configuration file (default: /etc/opmas/opmasd.yaml when it exists; $OPMAS_CONFIG)",
    )
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    parser.add_argument(
        "--list-agents",
        action="store_true",
        help="print the agent packages found in the agents directories (agents.dirs) and exit",
    )
    parser.add_argument("--version", action="version", version=f"opmasd {__version__}")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def list_agents(dirs: tuple[Path, ...]) -> int:
    """Each agent package's id and folder, a line each; a broken manifest on stderr (status 1)."""
    from opmasd.manager.packages.scan import scan

    print("agents directories: " + (", ".join(str(d) for d in dirs) or "none"))
    found = scan(dirs)
    for manifest in found.manifests:
        print(f"{manifest.agent_id}\t{manifest.path.parent}")
    for error in found.errors:
        print(f"opmasd: {error}", file=sys.stderr)
    return 1 if found.errors else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print(f"opmasd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.check_config:
        print(f"opmasd: configuration OK ({args.config or 'defaults'})")
        return
    configure_logging(config.service.log_level, config.service.log_format)
    if args.list_agents:
        raise SystemExit(list_agents(config.agents.dirs))

    from opmasd.api.grpc_server import ListenError
    from opmasd.api.rest.server import HttpListenError
    from opmasd.app import Daemon
    from opmasd.core.errors import StoreError
    from opmasd.directories import UnsafePathError
    from opmasd.instance_lock import AlreadyRunning
    from opmasd.systemd.listen_fds import passed_sockets, rest_socket

    log = structlog.get_logger("opmasd")
    try:
        # Before anything starts a child (the variables are dropped here) or the loop runs (a
        # host name in rest.address may be resolved to match the passed socket).
        passed = rest_socket(passed_sockets(), config.rest, str(args.config or "configuration"))
    except (ConfigError, ValueError) as exc:
        # A configuration error (2, as above): the unit's RestartPreventExitStatus= stops there.
        log.error("opmasd could not start", error=f"socket activation: {exc}")
        raise SystemExit(2) from None
    try:
        asyncio.run(Daemon(config, args.config, rest_socket=passed).serve())
    except (AlreadyRunning, ListenError, HttpListenError, StoreError, ConfigError, UnsafePathError) as exc:
        log.error("opmasd could not start", error=str(exc))
        raise SystemExit(1) from None
    except (OSError, ValueError) as exc:
        # A directory that cannot be made, a URL that cannot be used, ...: say what, and where.
        log.error("opmasd could not start", error=str(exc), exc_info=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
