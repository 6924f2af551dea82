"""The man pages opmasctl(1) and opmasd(8) (scripts/gen_man.py, `make man`): generated from the
parsers, every command and option of them on the page, rendered by man and groff without a
warning, with the hand-written sections beside them."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from opmasctl.cli import build_parser as opmasctl_parser
from opmasd.__main__ import build_parser as opmasd_parser

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO")


def gen_man() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "scripts" / "gen_man.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    written = gen_man().write_man_pages(out)
    return {path.name: path for path in written}


def commands(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(the command's words, its parser) for the program and every (sub)command under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield from commands(command, f"{path} {name}")


def options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if action.help is not argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            yield from action.option_strings


def rendered(page: Path) -> str:
    """The page as `man` shows it, 100 columns wide, plain text."""
    if shutil.which("man") is None:
        pytest.skip("man is not installed (.ci/run installs man-db)")
    env = {**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(
        ["man", "--warnings", "-l", "-P", "cat", str(page)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    # Bold and underline by overstriking, should the pager settings keep them.
    return re.sub(".\b", "", result.stdout)


def test_make_man_writes_both_pages(pages: dict[str, Path]) -> None:
    assert sorted(pages) == ["opmasctl.1", "opmasd.8"]
    assert pages["opmasctl.1"].read_text().startswith('.TH OPMASCTL "1"')
    assert pages["opmasd.8"].read_text().startswith('.TH OPMASD "8"')


@pytest.mark.parametrize("name", ["opmasctl.1", "opmasd.8"])
def test_groff_has_no_warning(pages: dict[str, Path], name: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (.ci/run installs groff-base)")
    result = subprocess.run(
        ["groff", "-ww", "-man", "-z", str(pages[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_opmasctl_page_has_every_command_and_option(pages: dict[str, Path]) -> None:
    text = rendered(pages["opmasctl.1"])
    headings = re.findall(r"^([A-Z][A-Z ]+)$", text, re.MULTILINE)
    for section in (*SECTIONS, "COMMANDS"):
        assert section in headings, (section, headings)
    # In man-pages(7) order: the commands between the options and the exit status.
    assert headings.index("OPTIONS") < headings.index("COMMANDS") < headings.index("EXIT STATUS")
    assert "opmasctl - manage the agents of opmasd" in text
    # Hyphenation is off: no option, path or variable broken at a hyphen (groff's is U+2010).
    assert "\u2010\n" not in text, re.findall(".*\u2010\n.*", text)
    listed = list(commands(opmasctl_parser(), "opmasctl"))
    assert len(listed) > 15  # agents and its subcommands, completion, ...
    for words, parser in listed:
        if words != "opmasctl":
            # A subsection per command, headed by its full command line.
            assert re.search(rf"^   {re.escape(words)}$", text, re.MULTILINE), words
        for option in options(parser):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (words, option)
    for code in ("0", "1", "2", "3", "4", "130"):
        assert re.search(rf"^       {code} +\S", text, re.MULTILINE), code
    for variable in ("OPMAS_SERVER", "OPMAS_CONFIG", "NO_COLOR"):
        assert re.search(rf"^       {variable}$", text, re.MULTILINE), variable
    for file in ("/etc/opmas/opmasd.yaml", "/run/opmas/opmasd.sock"):
        assert re.search(rf"^       {re.escape(file)}$", text, re.MULTILINE), file
    assert "opmasd(8)" in text


def test_opmasd_page_has_every_option(pages: dict[str, Path]) -> None:
    text = rendered(pages["opmasd.8"])
    headings = re.findall(r"^([A-Z][A-Z ]+)$", text, re.MULTILINE)
    for section in SECTIONS:
        assert section in headings, (section, headings)
    assert text.startswith("OPMASD(8)")
    found = list(options(opmasd_parser()))
    assert {"--config", "--check-config", "--version"} <= set(found)
    for option in found:
        assert re.search(rf"^       {re.escape(option)}\b", text, re.MULTILINE), option
    for variable in ("OPMAS_CONFIG", "NO_COLOR"):
        assert re.search(rf"^       {variable}$", text, re.MULTILINE), variable
    assert "/etc/opmas/opmasd.yaml" in text and "opmasctl(1)" in text
    assert "SIGHUP" in text


def test_the_page_follows_the_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command or flag added to the parser is on the page without touching gen_man.py."""
    module = gen_man()

    def extended() -> argparse.ArgumentParser:
        parser = opmasctl_parser()
        (groups,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        extra = groups.add_parser("frobnicate", help="a command only this test has")
        extra.add_argument("--with-knobs", help="a flag only this test has")
        return parser

    monkeypatch.setattr(module, "opmasctl_parser", extended)
    (page,) = [p for p in module.write_man_pages(tmp_path) if p.name == "opmasctl.1"]
    text = rendered(page)
    assert re.search(r"^   opmasctl frobnicate$", text, re.MULTILINE)
    assert "--with-knobs" in text and "a flag only this test has" in text


def test_make_man_runs_the_generator() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(
        r"^man: install\n\t\$\(BIN\)/python scripts/gen_man.py build/man$", makefile, re.MULTILINE
    )
