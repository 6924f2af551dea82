"""An agent's control characters are shown, not obeyed, where opmasctl shows logs to a person."""

from __future__ import annotations

from opmas.v1 import agents_pb2 as pb
from opmasctl.cli import build_parser
from opmasctl.logs import log_line
from opmasctl.output import visible_controls
from opmasctl.top_model import log_text


def test_every_control_but_tab_is_shown_as_hex() -> None:
    controls = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09]
    for char in controls:
        assert visible_controls(char) == f"\\x{ord(char):02x}"
    # Printable text, tab and non-ASCII letters are left alone.
    assert visible_controls("a\tb é ü 漢 \\x1b") == "a\tb é ü 漢 \\x1b"


def test_a_log_line_is_raw_unless_asked_to_show_controls() -> None:
    line = pb.LogLine(line="\x1b[2Jhi\r\n", stream=pb.LOG_STREAM_STDERR, agent_id="a")
    assert log_line(line) == "[err] \x1b[2Jhi\r\n"
    assert log_line(line, prefix=True, raw=False) == "[a] [err] \\x1b[2Jhi\\x0d\n"
    assert log_text(line) == "[err] \\x1b[2Jhi\\x0d"  # opmasctl top's log view: a terminal


def test_raw_is_a_flag_of_agents_logs() -> None:
    parser = build_parser()
    args = parser.parse_args(["agents", "logs", "x", "--raw"])
    assert args.raw is True
    assert parser.parse_args(["agents", "logs", "x"]).raw is False
