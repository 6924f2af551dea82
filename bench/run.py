"""opmasd side by side with supervisord and circus, in one run, interleaved.

    .venv/bin/python bench/run.py [--full] [--rounds N] [--scenarios 1,2,...] [--systems a,b]
                                  [--json PATH]

(`make bench` builds bench/.venv with supervisor and circus first.) Scenarios:
  1 spawn N agents (cold start)      2 status latency (N=10, N=1000)   3 list all (N=1000)
  4 kill -9 → restarted              5 stop all (+ the start→stop stall check)
  6 heartbeat intake over NATS       7 footprint (RSS, idle CPU)       8 REST vs gRPC
  9 systemd backend vs systemd-run
Each scenario runs every system in each round, the order rotated round by round. The table
shows medians (p50) and p99s over the raw samples, and opmasd / peer ratios; the raw figures
go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    INTERRUPTED,
    PEER_VENV,
    REPO,
    become_subreaper,
    cleanup_all,
    install_signal_handlers,
    machine_info,
    raise_fd_limit,
)
from context import SYSTEMS, Context, Recorder, Sizes
from report import render
from scenarios import fleet, heartbeat, lifecycle, systemd


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the large sizes (spawn 1000, more calls)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default 5)")
    parser.add_argument("--scenarios", default="1,2,3,4,5,6,7,8,9", help="which scenarios, e.g. 1,4")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which systems (default: all three)")
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="where the raw figures go",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        args.scenario_set = {int(x) for x in args.scenarios.split(",") if x.strip()}
    except ValueError:
        parser.error(f"--scenarios: a comma-separated list of numbers 1-9, not {args.scenarios!r}")
    if not args.scenario_set <= set(range(1, 10)):
        parser.error("--scenarios: numbers 1-9")
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.system_list) - set(SYSTEMS)
    if unknown or not args.system_list:
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    return args


def versions() -> dict[str, str]:
    found = {}
    site = next(PEER_VENV.glob("lib/python3*/site-packages"), None)
    for name in ("supervisor", "circus", "pyzmq"):
        dist = next(site.glob(f"{name}-*.dist-info"), None) if site else None
        found[name] = dist.name.removeprefix(f"{name}-").removesuffix(".dist-info") if dist else "missing"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    found["opmasd"] = head
    return found


def check_peers(systems: list[str]) -> None:
    need = {"supervisord": "supervisord", "circus": "circusd"}
    missing = [
        binary
        for system, binary in need.items()
        if system in systems and not (PEER_VENV / "bin" / binary).exists()
    ]
    if missing:
        sys.exit(
            f"{', '.join(missing)} not found in {PEER_VENV}: "
            "run `make bench` (it installs supervisor and circus there)"
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_peers(args.system_list)
    install_signal_handlers()
    become_subreaper()
    raise_fd_limit()
    sizes = Sizes.for_run(args.full, args.rounds)
    rec = Recorder()
    rec.data.update(
        machine=machine_info(),
        versions=versions(),
        systems=args.system_list,
        rounds=args.rounds,
        full=args.full,
        sizes=sizes.__dict__,
        settings={name: SYSTEMS[name].settings for name in args.system_list},
    )
    m = rec.data["machine"]
    print(
        f"Machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu']}, {m['memory_gb']} GB RAM, "
        f"Python {m['python']}, Linux {m['kernel']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in rec.data["versions"].items()))
    if m["loadavg_at_start"][0] > 0.5:
        print(f"note: the machine is not idle (load average {m['loadavg_at_start']}): expect noisier figures")
    if args.rounds < 5:
        print(f"note: {args.rounds} rounds; the figures are meant to come from at least 5")
    ctx = Context(args.system_list, args.rounds, args.full, sizes, rec)
    wanted = args.scenario_set
    started = time.perf_counter()
    failed: list[str] = []
    steps = [
        (1, "spawn", lambda: lifecycle.spawn(ctx)),
        (2, "fleet scenarios", lambda: fleet.run(ctx, wanted, check_stalls=5 in wanted)),
        (5, "stop all", lambda: lifecycle.stop_all(ctx)),
        (6, "heartbeat intake", lambda: heartbeat.heartbeat(ctx)),
        (9, "systemd backend", lambda: systemd.systemd(ctx)),
    ]
    try:
        for number, name, step in steps:
            selected = number in wanted if number != 2 else bool(wanted & {2, 3, 4, 5, 7, 8})
            if not selected:
                continue
            try:
                step()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failing scenario must not lose the others
                if INTERRUPTED.is_set():  # the interrupt surfaced as a broken call
                    raise KeyboardInterrupt from exc
                failed.append(f"{name}: {exc}")
                print(f"\n!! {name} failed: {exc}\n", file=sys.stderr, flush=True)
            finally:
                ctx.close_all()
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        ctx.close_all()
        left = cleanup_all()
        if left:
            print(f"warning: {len(left)} processes of this run were left behind and killed", file=sys.stderr)
        rec.data["elapsed_seconds"] = time.perf_counter() - started
        rec.data["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        rec.data["failed"] = failed
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rec.data, indent=1))
    table = render(rec.data)
    print("\n" + table)
    args.json.with_suffix(".txt").write_text(table + "\n")
    print(f"\nraw figures: {args.json}   ({rec.data['elapsed_seconds']:.0f} s)")
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
