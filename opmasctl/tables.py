"""Tables for people: aligned columns, fitted to the terminal's width, the state in colour.

Only when stdout is a terminal: the table is then cut to its width, the widest of its free-text
columns (a command line, a name, a path) shortened first with '…'; the id and the short status
columns are never cut (a table that does not fit even so runs past the edge, as systemctl's
does). Colour is used unless NO_COLOR is set (https://no-color.org) or TERM is dumb. Piped, a
table is never cut and carries no escape codes.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from opmasctl.output import visible_controls

ELLIPSIS = "…"
GAP = "  "
# A column is not cut below this many characters (nor below its own widest cell).
MIN_WIDTH = 4
# SGR colours by name, for the views to pick from.
GREEN, RED, YELLOW, CYAN = "32", "31", "33", "36"


@dataclass(frozen=True)
class TableStyle:
    """How tables are drawn: with the header line or not, the extra columns of -o wide, the
    width to fit (None: no limit) and whether to colour."""

    headers: bool = True
    wide: bool = False
    width: int | None = None
    colour: bool = False

    @classmethod
    def detect(
        cls,
        *,
        headers: bool = True,
        wide: bool = False,
        stream: TextIO | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TableStyle:
        """The style for output to `stream` (stdout): fitted and coloured only on a terminal."""
        stream = sys.stdout if stream is None else stream
        env = os.environ if env is None else env
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):  # a closed or fake stream
            tty = False
        if not tty:
            return cls(headers=headers, wide=wide)
        colour = not env.get("NO_COLOR") and env.get("TERM") != "dumb"
        # $COLUMNS first, then the terminal's own size, as `ls` does.
        width = shutil.get_terminal_size().columns
        return cls(headers=headers, wide=wide, width=width if width > 0 else None, colour=colour)


PLAIN = TableStyle()


def fit(widths: Sequence[int], limit: int, elastic: Collection[int]) -> list[int]:
    """Column widths whose line fits `limit`: the widest `elastic` column gives way first (ties:
    the rightmost), until the line fits or every elastic column is down to MIN_WIDTH."""
    widths = list(widths)
    excess = sum(widths) + len(GAP) * (len(widths) - 1) - limit
    while excess > 0:
        shrinkable = [i for i in elastic if widths[i] > MIN_WIDTH]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: (widths[i], i))
        # Down to the next widest in one step (one character when they tie, taking turns).
        runner_up = max([MIN_WIDTH, *(widths[i] for i in shrinkable if i != widest)])
        step = max(min(excess, widths[widest] - runner_up), 1)
        widths[widest] -= step
        excess -= step
    return widths


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    style: TableStyle = PLAIN,
    colours: Mapping[int, Mapping[str, str]] | None = None,
    elastic: Collection[int] | None = None,
) -> str:
    """Columns padded to their widest cell, two spaces apart, the last one not padded.

    colours: by column index, the SGR code of a cell's text (e.g. {3: {"running": GREEN}}).
    elastic: the columns that may be cut to fit the terminal (default: all but the first).
    """
    # Cells carry what agents and operators wrote (reasons, commands): shown, never obeyed, and
    # a newline cannot add a row that is none.
    rows = [[visible_controls(cell) for cell in row] for row in rows]
    widths = [len(header) if style.headers else 0 for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    if style.width is not None:
        widths = fit(widths, style.width, range(1, len(widths)) if elastic is None else elastic)
    shown = [list(headers)] if style.headers else []
    lines = [_line(row, widths, None) for row in shown]
    lines += [_line(row, widths, colours if style.colour else None) for row in rows]
    return "".join(line + "\n" for line in lines)


def _line(row: Sequence[str], widths: Sequence[int], colours: Mapping[int, Mapping[str, str]] | None) -> str:
    cells = []
    last = len(row) - 1
    for index, cell in enumerate(row):
        text = cut(cell, widths[index])
        padding = "" if index == last else " " * (widths[index] - len(text))
        code = colours.get(index, {}).get(cell) if colours else None
        cells.append((f"\x1b[{code}m{text}\x1b[0m" if code else text) + padding)
    return GAP.join(cells).rstrip()
