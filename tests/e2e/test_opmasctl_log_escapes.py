"""`opmasctl agents logs` never lets an agent's control characters reach the operator's terminal:
on a terminal they are shown as \\xNN; with --raw, or into a pipe, the line goes as written."""

from __future__ import annotations

import os
import pty
import subprocess
import time
import tty

from .harness import OPMASCTL, Sandbox, create, python_agent, spawn, wait_for

# A title change, a screen clear, a carriage return that hides "secret", a C1 CSI, a tab.
HOSTILE = "\x1b]0;pwned\x07\x1b[2Jsecret\rX\x9b31m\tend"
AGENT = python_agent(
    f"""
    import sys, time
    sys.stdout.write({HOSTILE!r} + "\\n")
    sys.stdout.flush()
    time.sleep(1000)
    """
)
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2Jsecret\\x0dX\\x9b31m\tend"


def _on_a_terminal(box: Sandbox, *args: str) -> str:
    """opmasctl's stdout as a terminal would receive it (a pty in raw mode: no \\n -> \\r\\n)."""
    leader, follower = pty.openpty()
    tty.setraw(follower)
    try:
        popen = spawn(
            [*OPMASCTL, "--server", str(box.socket), *args],
            env=box.client_env(),
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
        )
        os.close(follower)
        chunks = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert popen.wait(30) == 0, popen.stderr.read() if popen.stderr else ""
    finally:
        os.close(leader)
    return b"".join(chunks).decode()


def test_control_characters_are_shown_on_a_terminal_and_kept_in_a_pipe(make_sandbox) -> None:  # type: ignore[no-untyped-def]
    box = make_sandbox("log-escapes")
    box.start()
    create(box.stub, "hostile", AGENT, start=True)
    wait_for(lambda: "end" in box.opmasctl("agents", "logs", "hostile").stdout, what="the agent's line")

    # (after opmasd's own "--- opmasd: started pid ... ---" line)
    shown = _on_a_terminal(box, "agents", "logs", "hostile")
    assert shown.endswith("---\n" + SHOWN + "\n") and "\x1b" not in shown, repr(shown)
    assert _on_a_terminal(box, "agents", "logs", "hostile", "--raw").endswith("---\n" + HOSTILE + "\n")
    piped = subprocess.run(  # bytes: text mode would turn the agent's \r into \n
        [*OPMASCTL, "--server", str(box.socket), "agents", "logs", "hostile"],
        env=box.client_env(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert piped.stdout.decode().endswith("---\n" + HOSTILE + "\n")
    # With timestamps, the time is ours and the rest still shown.
    stamped = _on_a_terminal(box, "agents", "logs", "hostile", "--timestamps")
    assert stamped.endswith(" " + SHOWN + "\n") and "\x1b" not in stamped
