"""opmasctl's human output shows control characters from agents, never hands them to the terminal."""

from __future__ import annotations

from opmas.v1 import agents_pb2
from opmasctl import tables, views
from opmasctl.output import key_values

HOSTILE = "\x1b[2J\x1b]0;PWNED\x07"


def test_a_reason_with_terminal_escapes_is_shown_not_obeyed() -> None:
    text = key_values([("Reason", f"killed 1 leftover process(es): 42 {HOSTILE}sleep"), ("Env", "A=1\nB=2")])
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2J\\x1b]0;PWNED\\x07sleep" in text
    assert text.splitlines()[2].strip() == "B=2"  # a multi-line value keeps its lines


def test_a_table_cell_cannot_add_a_row_or_an_escape() -> None:
    agent = agents_pb2.Agent(agent_id="a")
    agent.spec.command.extend(["/bin/sh", "-c", f"x\nb  fake-row  running{HOSTILE}"])
    table = views.agents_table([agent], tables.TableStyle(wide=True))
    assert len(table.splitlines()) == 2  # the header and one row
    assert "\x1b" not in table and "\x07" not in table


def test_an_adopted_process_s_unknown_exit_is_not_shown_as_exit_0() -> None:
    status = agents_pb2.AgentStatus()
    status.last_exit.reason = "exited (status unknown: process was adopted)"
    assert views.last_exit_short(status) == "unknown"
    status.last_exit.reason = "exited with code 0"
    assert views.last_exit_short(status) == "exit 0"
