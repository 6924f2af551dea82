"""Profile opmasd with py-spy (from bench/.venv) while it does one scenario's work.

    .venv/bin/python bench/profile.py list|stop_all|api_spawn|status|status_rest [--n N] [--repeat R]

Starts opmasd with N agents, records it with `py-spy record --format raw` during the operation
(repeated R times), and prints the hottest frames: by self time (the leaf: function, file:line)
and by inclusive time (functions of opmasd's own code on the stack).
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import time

from common import PEER_VENV, become_subreaper, cleanup_all, make_tmp
from google.protobuf import duration_pb2
from peers.base import SLEEP_WITH_CHILD, Fleet
from peers.opmasd import OpmasdDriver

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def record_start(pid: int, out: str, rate: int) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen(
        [
            str(PEER_VENV / "bin" / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            out,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # py-spy attaches
    return popen


def record_stop(popen: subprocess.Popen[bytes]) -> None:
    popen.send_signal(signal.SIGINT)
    try:
        popen.wait(30)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def summarize(path: str, top: int = 15) -> str:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [fr for fr in stack.split(";") if FRAME.match(fr.strip())]
            if not frames:
                continue
            total += count
            self_time[_short(frames[-1])] += count
            seen = set()
            for frame in frames:
                m = FRAME.match(frame.strip())
                if m and ("/opmasd/" in m["file"] or m["file"].startswith("opmasd/")):
                    key = f"{m['func']} ({_path(m['file'])})"
                    if key not in seen:
                        seen.add(key)
                        inclusive[key] += count
    out = [f"{total} samples", "", "self time (leaf frame):"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in self_time.most_common(top)]
    out += ["", "inclusive time (opmasd's functions on the stack):"]
    out += [f"  {100 * c / total:5.1f}%  {k}" for k, c in inclusive.most_common(top)]
    return "\n".join(out)


def _path(file: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    return f"{m['func']} ({_path(m['file'])}:{m['line']})" if m else frame


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["list", "stop_all", "api_spawn", "status", "status_rest"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=int, default=250)
    args = parser.parse_args()
    become_subreaper()
    out = str(make_tmp("prof") / "pyspy.txt")
    try:
        driver = OpmasdDriver()
        command = list(SLEEP_WITH_CHILD) if args.what == "stop_all" else None
        fleet = Fleet(args.n, command=command) if command else Fleet(args.n)
        if args.what == "api_spawn":
            driver.fleet = fleet
            driver._launch()
            spy = record_start(driver.daemon_pid, out, args.rate)
            t0 = time.perf_counter()
            calls = [driver.stub.CreateAgent.future(_create(name, fleet)) for name in fleet.names()]
            for call in calls:
                call.result()
            driver._wait_all_running(args.n, t0, 600)
            print(f"create+start {args.n}: {time.perf_counter() - t0:.2f} s")
            record_stop(spy)
        else:
            driver.prepare(fleet)
            driver.boot()
            if args.what == "stop_all":  # profile the stops only, not the starts between them
                with open(out, "w") as merged:
                    for k in range(args.repeat):
                        part = f"{out}.{k}"
                        spy = record_start(driver.daemon_pid, part, args.rate)
                        t0 = time.perf_counter()
                        driver.request_stop_all()
                        print(f"stop all {args.n}: {time.perf_counter() - t0:.2f} s")
                        record_stop(spy)
                        merged.write(open(part).read())
                        for call in [driver.stub.StartAgent.future(_start(name)) for name in fleet.names()]:
                            call.result()
                        driver._wait_all_running(args.n, time.perf_counter(), 600)
                print(summarize(out))
                return 0
            spy = record_start(driver.daemon_pid, out, args.rate)
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                if args.what == "list":
                    for _ in range(50):
                        driver.list()
                elif args.what == "status":
                    for _ in range(2000):
                        driver.status("a0001")
                elif args.what == "status_rest":  # scenario 8's REST call
                    for _ in range(2000):
                        driver.status_rest("a0001")
                else:
                    driver.request_stop_all()
                    print(f"stop all {args.n}: {time.perf_counter() - t0:.2f} s")
                    for call in [driver.stub.StartAgent.future(_start(name)) for name in fleet.names()]:
                        call.result()
                    driver._wait_all_running(args.n, time.perf_counter(), 600)
                    continue
                print(f"{args.what}: {time.perf_counter() - t0:.2f} s")
            record_stop(spy)
        print(summarize(out))
    finally:
        cleanup_all()
    return 0


def _create(name: str, fleet: Fleet):
    from opmas.v1 import agents_pb2 as pb

    return pb.CreateAgentRequest(
        agent_id=name,
        spec=pb.AgentSpec(name=name, command=fleet.command, start_seconds=duration_pb2.Duration()),
        start=True,
    )


def _start(name: str):
    from opmas.v1 import agents_pb2 as pb

    return pb.StartAgentRequest(agent_id=name)


if __name__ == "__main__":
    sys.exit(main())
