"""Tab completion of opmasctl in real shells against a real opmasd: the script that
`opmasctl completion SHELL` prints is sourced, its completion function run as the shell runs
it on TAB, and what it offers read back — the daemon's live agent ids, subcommands, flags.

bash always; zsh and fish when installed (.ci/run installs them). Without them, their tests
still check the script registers itself, then skip the live part.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from opmas.v1 import agents_pb2 as pb
from opmasctl.cli import build_parser

from .harness import Sandbox, create, sandbox, sleeper

pytestmark = pytest.mark.timeout(90)

IDS = ["alpha", "alpine", "beta"]
BIN = str(Path(sys.executable).parent)

# COMP_* as bash sets them for a TAB at the end of $1, then the function `complete -p` names.
BASH = r"""
source <(opmasctl completion bash) || exit 3
function=$(complete -p opmasctl | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[[ $function == _python_argcomplete ]] || { echo "registered: $(complete -p opmasctl)" >&2; exit 4; }
COMP_LINE=$1
COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
"$function" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""

# zsh's completion system proper needs a terminal (zle); what it would list is what the
# function hands to _describe, so that is stood in for after the script is sourced and
# registered through compdef.
ZSH = r"""
autoload -U compinit && compinit -u -D
source <(opmasctl completion zsh) || exit 3
[[ $_comps[opmasctl] == _python_argcomplete ]] || { print -u2 "registered: $_comps[opmasctl]"; exit 4 }
_describe() { print -rl -- "${(@P)2}" }
BUFFER=$1
CURSOR=${#BUFFER}
words=(${(z)BUFFER})
[[ $BUFFER == *" " ]] && words+=("")
$_comps[opmasctl]
"""

FISH = r"""
opmasctl completion fish | source; or exit 3
complete --command opmasctl | string match -q '*__fish_opmasctl_complete*'; or exit 4
complete -C $argv[1]
"""


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with sandbox("completion") as b:
        b.start()
        for agent_id in IDS:
            create(b.stub, agent_id, sleeper())
        yield b


def commands() -> list[str]:
    """opmasctl's top-level commands, from its parser."""
    (group,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(group.choices)


def shell(box: Sandbox, argv: list[str], extra: dict[str, str] | None = None) -> list[str]:
    """Runs a completion script; the words it offered (fish: the part before the description)."""
    env = box.client_env({"PATH": f"{BIN}:{box.client_env().get('PATH', '')}", **(extra or {})})
    result = subprocess.run(
        argv,
        env=env,
        cwd=box.root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{argv[:2]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    # Nothing over the user's command line: no traceback, no grpc noise, no warning.
    assert result.stderr == ""
    # A single match comes with the space the shell would insert after it.
    return sorted({line.split("\t")[0].rstrip(" ") for line in result.stdout.splitlines() if line})


def bash(box: Sandbox, line: str, extra: dict[str, str] | None = None) -> list[str]:
    return shell(box, ["bash", "-c", BASH, "bash", line], extra)


def test_the_completion_script_and_opmasctl_agree(box: Sandbox) -> None:
    """What the e2e shells source is what the command prints (run the way the tests run opmasctl)."""
    result = box.opmasctl("completion", "bash", server=None)
    assert result.returncode == 0, result.stderr
    assert "-F _python_argcomplete opmasctl" in result.stdout
    via_path = subprocess.run(
        [f"{BIN}/opmasctl", "completion", "bash"], capture_output=True, text=True, timeout=30, check=True
    )
    assert via_path.stdout == result.stdout


def test_bash_completes_the_live_agent_ids(box: Sandbox) -> None:
    sock = str(box.socket)
    assert bash(box, f"opmasctl --server {sock} agents stop ") == IDS
    assert bash(box, f"opmasctl --server {sock} agents stop al") == ["alpha", "alpine"]
    assert bash(box, f"opmasctl --server {sock} agents get alph") == ["alpha"]
    # A new agent is there at the next TAB: asked each time, not cached.
    create(box.stub, "betamax", sleeper())
    try:
        assert bash(box, f"opmasctl --server {sock} agents logs bet") == ["beta", "betamax"]
    finally:
        box.stub.DeleteAgent(pb.DeleteAgentRequest(agent_id="betamax"), timeout=15)


def test_bash_takes_the_daemon_from_the_line_or_the_environment(box: Sandbox) -> None:
    sock = str(box.socket)
    # --server after the command, as the command itself accepts it.
    assert bash(box, f"opmasctl agents start --server {sock} b") == ["beta"]
    assert bash(box, "opmasctl agents status a", {"OPMAS_SERVER": sock}) == ["alpha", "alpine"]
    # watch takes several ids: one already given is not offered again.
    assert bash(box, f"opmasctl --server {sock} agents watch alpha ") == ["alpine", "beta"]


def test_bash_completes_commands_flags_and_choices_without_a_daemon(box: Sandbox) -> None:
    absent = str(box.root / "absent.sock")
    assert bash(box, "opmasctl agents st") == ["start", "status", "stop"]
    assert bash(box, "opmasctl ") == commands()
    assert "completion" in commands()
    assert bash(box, "opmasctl agents logs --t") == ["--tail", "--timeout", "--timestamps", "--token"]
    assert bash(box, "opmasctl -o y") == ["yaml"]
    assert bash(box, "opmasctl completion ") == ["bash", "fish", "zsh"]
    # No daemon there: no ids, and (the script run to its end) no error.
    assert bash(box, f"opmasctl --server {absent} agents stop ") == []


def test_zsh_completes_the_live_agent_ids(box: Sandbox) -> None:
    script = box.opmasctl("completion", "zsh", server=None).stdout
    assert script.startswith("#compdef opmasctl\n") and "compdef _python_argcomplete opmasctl" in script
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (.ci/run installs it)")
    sock = str(box.socket)
    # zsh shows each word with its description, "word:description".
    words = shell(box, ["zsh", "-f", "-c", ZSH, "zsh", f"opmasctl --server {sock} agents stop "])
    assert [w.split(":")[0] for w in words] == IDS
    words = shell(box, ["zsh", "-f", "-c", ZSH, "zsh", f"opmasctl --server {sock} agents restart alp"])
    assert [w.split(":")[0] for w in words] == ["alpha", "alpine"]
    words = shell(box, ["zsh", "-f", "-c", ZSH, "zsh", "opmasctl agents sto"])
    assert words == ["stop:stop agents: by id, --all or -l SELECTOR"]


def test_fish_completes_the_live_agent_ids(box: Sandbox) -> None:
    script = box.opmasctl("completion", "fish", server=None).stdout
    assert "complete --command opmasctl -f -a '(__fish_opmasctl_complete)'" in script
    if shutil.which("fish") is None:
        pytest.skip("fish is not installed (.ci/run installs it)")
    sock = str(box.socket)

    def fish(line: str) -> list[str]:
        return shell(box, ["fish", "--no-config", "-c", FISH, line], {"HOME": str(box.root)})

    assert fish(f"opmasctl --server {sock} agents stop ") == IDS
    assert fish(f"opmasctl --server {sock} agents delete alpi") == ["alpine"]
    assert fish("opmasctl agents sto") == ["stop"]
    assert fish("opmasctl agents logs --ti") == ["--timeout", "--timestamps"]
