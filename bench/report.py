"""The table of a run: medians and p99s per scenario and system, opmasd / peer ratios, targets.

Also usable on its own to print the table of a saved run:
    .venv/bin/python bench/report.py bench/results/latest.json
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import median, percentile

PEERS = ("supervisord", "circus", "systemd-run")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    stat: str  # p50 | p99 | max | count>=X
    unit: str = "ms"
    # A target on opmasd's figure: (description, check(value, figures of the key by system)).
    target: tuple[str, Callable[[float, dict[str, float]], bool]] | None = None
    # A reference measured in the same run that is not a system of the table (9: systemd-run):
    # its figure and opmasd's ratio to it go in the target column.
    baseline: str | None = None


def _time_rows(
    key: str, label: str, p50: tuple | None = None, p99: tuple | None = None, baseline: str | None = None
) -> list[Row]:
    return [
        Row(key, label, "p50", target=p50, baseline=baseline),
        Row(key, label, "p99", target=p99, baseline=baseline),
    ]


def rows_for(data: dict[str, Any]) -> list[Row]:
    keys = list(data["scenarios"])
    rows: list[Row] = []
    for key in sorted((k for k in keys if k.startswith("1.spawn.")), key=lambda k: int(k.split("=")[1])):
        n = int(key.split("=")[1])
        target = ("≤ 0.7x supervisord", lambda v, f: v <= 0.7 * f["supervisord"]) if n == 500 else None
        rows += _time_rows(key, f"1 spawn N={n}", p50=target)
        if f"1.shutdown.N={n}" in keys:
            rows.append(Row(f"1.shutdown.N={n}", f"1 shutdown N={n}", "p50"))
    for key in sorted((k for k in keys if k.startswith("1b.api_spawn.")), key=lambda k: int(k.split("=")[1])):
        rows.append(Row(key, f"1b API create+start N={key.split('=')[1]}", "p50"))
    for key in sorted((k for k in keys if k.startswith("2.status.")), key=lambda k: int(k.split("=")[1])):
        n = key.split("=")[1]
        rows += _time_rows(
            key,
            f"2 status N={n}",
            p50=("≤ 1 ms", lambda v, f: v <= 1.0),
            p99=("≤ 3 ms", lambda v, f: v <= 3.0),
        )
    for key in sorted(k for k in keys if k.startswith("3.list.")):
        rows += _time_rows(key, f"3 list N={key.split('=')[1]}", p50=("≤ 20 ms", lambda v, f: v <= 20.0))
    if "4.crash_restart" in keys:
        rows += _time_rows(
            "4.crash_restart",
            "4 crash → restarted",
            p50=("≤ 10 ms", lambda v, f: v <= 10.0),
            p99=("≤ 50 ms", lambda v, f: v <= 50.0),
        )
    for key in sorted(k for k in keys if k.startswith("5.stop_all.N")):
        n = key.split("=")[1]
        rows += _time_rows(key, f"5 stop all N={n}: all gone")
        rows.append(Row(f"5.stop_all_api.N={n}", f"5 stop all N={n}: API returned", "p50"))
        rows.append(Row(f"5.stop_all_per_process.N={n}", f"5 stop all N={n}: per process", "p50"))
        rows.append(Row(f"5.stop_all_per_process.N={n}", f"5 stop all N={n}: per process", "max"))
        rows.append(Row(f"5.stop_all_left.N={n}", f"5 stop all N={n}: processes left", "max", unit=""))
    if "5b.start_stop" in keys:
        rows += _time_rows("5b.start_stop", "5b start→stop at once")
        rows.append(Row("5b.start_stop", "5b start→stop at once", "max"))
        rows.append(
            Row(
                "5b.start_stop",
                "5b stalls (stop ≥ 0.8 s)",
                "stalls",
                unit="",
                target=("none", lambda v, f: v == 0),
            )
        )
    if "6.heartbeat_rate" in keys:
        rows.append(
            Row(
                "6.heartbeat_rate",
                "6 heartbeats sustained",
                "p50",
                "/s",
                ("≥ 20000/s", lambda v, f: v >= 20000),
            )
        )
        rows.append(Row("6.heartbeat_cpu", "6   opmasd CPU at that rate", "p50", "%"))
        rows.append(Row("6.heartbeat_commits", "6   store commits at that rate", "p50", "/s"))
        cpu_target = ("< 50 %", lambda v, f: v < 50)
        rows.append(Row("6.heartbeat_cpu_at_target", "6   opmasd CPU at 20000/s", "p50", "%", cpu_target))
        commit_target = ("≤ 2/s", lambda v, f: v <= 2)
        rows.append(
            Row("6.heartbeat_commits_at_target", "6   store commits at 20000/s", "p50", "/s", commit_target)
        )
    for key in sorted((k for k in keys if k.startswith("7.rss.")), key=lambda k: int(k.split("=")[1])):
        n = int(key.split("=")[1])
        rows.append(
            Row(key, f"7 RSS N={n}", "p50", "MB", ("≤ 80 MB", lambda v, f: v <= 80) if n == 1000 else None)
        )
        rows.append(
            Row(
                f"7.idle_cpu.N={n}",
                f"7 idle CPU N={n}",
                "p50",
                "%",
                ("≤ 1 %", lambda v, f: v <= 1.0) if n == 1000 else None,
            )
        )
        if f"7.helpers_rss.N={n}" in keys:
            rows.append(Row(f"7.helpers_rss.N={n}", f"7   + nats-server RSS N={n}", "p50", "MB"))
            rows.append(Row(f"7.helpers_idle_cpu.N={n}", f"7   + nats-server CPU N={n}", "p50", "%"))
    if "8.rest_status" in keys:
        rows += _time_rows("8.rest_status", "8 status over REST")
        rows += _time_rows("8.grpc_tcp_status", "8 status over gRPC/TCP")
        rows.append(
            Row("8.rest_overhead", "8 REST - gRPC", "p50", target=("≤ 0.5 ms", lambda v, f: v <= 0.5))
        )
        rows.append(Row("8.rest_overhead_p99", "8 REST - gRPC", "p99"))
    if "8.rest_cpu" in keys:  # runs before the daemon's CPU per call was recorded have none
        rows.append(Row("8.rest_cpu", "8 opmasd CPU per REST call", "p50"))
        rows.append(Row("8.grpc_tcp_cpu", "8 opmasd CPU per gRPC call", "p50"))
        rows.append(Row("8.rest_cpu_overhead", "8 CPU REST - gRPC", "p50"))
    for key in ("9.systemd_start", "9.systemd_stop"):
        if key in keys:
            what = "all units active" if key.endswith("start") else "all units stopped"
            rows += _time_rows(key, f"9 systemd: {what}", baseline="systemd-run")
            if key.endswith("start") and "9.systemd_start_api" in keys:
                rows.append(Row("9.systemd_start_api", "9 systemd: StartAgent calls answered", "p50"))
    if "9.systemd_start_failures" in keys:
        rows.append(
            Row(
                "9.systemd_start_failures",
                "9 systemd: starts failed, all rounds",
                "sum",
                unit="",
                target=("none", lambda v, f: v == 0),
            )
        )
    return rows


def figure(samples: list[float], stat: str, unit: str) -> float:
    if not samples:
        return math.nan
    scale = 1000.0 if unit == "ms" else 1.0
    if stat == "p50":
        return median(samples) * scale
    if stat == "p99":
        return percentile(samples, 99) * scale
    if stat == "max":
        return max(samples) * scale
    if stat == "sum":
        return float(sum(samples))
    if stat == "stalls":
        return float(sum(1 for s in samples if s >= 0.8))
    raise ValueError(stat)


def derived(data: dict[str, Any]) -> None:
    """Figures computed from others (the REST overhead), added in place."""
    s = data["scenarios"]
    if "8.rest_status" in s and "8.grpc_tcp_status" in s:
        rest, grpc = s["8.rest_status"]["opmasd"], s["8.grpc_tcp_status"]["opmasd"]
        s["8.rest_overhead"] = {"opmasd": [median(rest) - median(grpc)]}
        s["8.rest_overhead_p99"] = {"opmasd": [percentile(rest, 99) - percentile(grpc, 99)]}
    if "8.rest_cpu" in s and "8.grpc_tcp_cpu" in s:
        rest, grpc = s["8.rest_cpu"]["opmasd"], s["8.grpc_tcp_cpu"]["opmasd"]
        s["8.rest_cpu_overhead"] = {"opmasd": [median(rest) - median(grpc)]}


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "—"
    if unit == "ms":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    if unit == "/s":
        return f"{value:.0f}"
    if unit == "":
        return f"{value:.0f}"
    return f"{value:.1f}"


def evaluate(data: dict[str, Any]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """The table's lines (as cells) and the targets with their outcome."""
    derived(data)
    systems = [s for s in data["systems"]]
    peers = [s for s in systems if s != "opmasd"]
    lines: list[list[str]] = []
    verdicts: list[dict[str, Any]] = []
    for row in rows_for(data):
        by_system = data["scenarios"].get(row.key, {})
        values = {s: figure(by_system.get(s, []), row.stat, row.unit) for s in [*systems, "systemd-run"]}
        cells = [row.label, f"{row.stat} {row.unit}".strip()]
        cells += [_fmt(values[s], row.unit) for s in systems]
        for peer in peers:
            a, b = values.get("opmasd", math.nan), values[peer]
            cells.append(f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "—")
        target, met = "", ""
        if row.baseline is not None and not math.isnan(values[row.baseline]):
            a, b = values.get("opmasd", math.nan), values[row.baseline]
            ratio = f": {a / b:.2f}x" if b and not math.isnan(a) else ""
            target = f"{row.baseline} {_fmt(b, row.unit)} {row.unit}{ratio}"
        if row.target is not None and "opmasd" in values and not math.isnan(values["opmasd"]):
            description, check = row.target
            try:
                ok = check(values["opmasd"], values)
            except KeyError:
                ok = None
            target, met = description, {True: "yes", False: "MISSED", None: "?"}[ok]
            verdicts.append(
                {
                    "scenario": row.label,
                    "stat": row.stat,
                    "opmasd": values["opmasd"],
                    "unit": row.unit,
                    "target": description,
                    "met": ok,
                }
            )
        cells += [target, met]
        lines.append(cells)
    return lines, verdicts


def render(data: dict[str, Any]) -> str:
    systems = list(data["systems"])
    peers = [s for s in systems if s != "opmasd"]
    header = ["scenario", "stat", *systems, *[f"opmasd/{p}" for p in peers], "target", "met"]
    lines, verdicts = evaluate(data)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    out = []
    m = data["machine"]
    out.append(
        f"Machine: {m['cores']} cores ({m['usable_cores']} usable), {m['cpu']}, {m['memory_gb']} GB, "
        f"Python {m['python']}, Linux {m['kernel']} — {m['date']}"
    )
    out.append(
        f"Rounds: {data['rounds']} ({'full' if data['full'] else 'default'} sizes), "
        "order rotated each round; "
        f"opmasd {data.get('versions', {}).get('opmasd', '?')}; load average at start "
        f"{m.get('loadavg_at_start')}, at end {m.get('loadavg_at_end')}"
    )
    out.append("")
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    out.append("  ".join("-" * w for w in widths))
    previous = ""
    for cells in lines:
        label = re.sub(r"^(\d+b?) .*", r"\1", cells[0])
        if previous and label != previous:
            out.append("")
        previous = label
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)))
    notes = data.get("notes", {})
    na = [
        f"{k.split('.')[0]} {k.split('.', 1)[1]}: {v}"
        for k, v in sorted(notes.items())
        if v.startswith("n/a")
    ]
    if na:
        out.append("")
        out += na
    missed = [v for v in verdicts if v["met"] is False]
    out.append("")
    out.append(
        "Targets missed: "
        + (
            ", ".join(
                f"{v['scenario']} {v['stat']} ({_fmt(v['opmasd'], v['unit'])} "
                f"{v['unit']}, target {v['target']})"
                for v in missed
            )
            or "none"
        )
    )
    return "\n".join(out)


if __name__ == "__main__":
    print(render(json.loads(open(sys.argv[1]).read())))
