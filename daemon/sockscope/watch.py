"""`sockscope snapshot --watch`: take a frame every interval and redraw it in place.

On a terminal each frame overwrites the previous one (cursor home, every line cleared to
its end, the rest of the screen cleared: no blank flash between frames) and is cut to the
terminal's size, since a frame taller than the screen would scroll and break the redraw.
Anywhere else (a pipe, a file) frames are written one after another, never with escape
codes. The schedule is monotonic on a fixed grid; a frame that overruns skips the missed
slots. Memory: only the first and the previous frame are kept (their Surveys without the
per-socket index), whatever the number of frames.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"  # to the end of the line
CLEAR_BELOW = "\x1b[J"  # to the end of the screen
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
RESET = "\x1b[0m"
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def use_colour(choice: str, stream: TextIO, environ: Mapping[str, str]) -> bool:
    """--color: always, never, or auto: a terminal, unless NO_COLOR is set to anything
    non-empty (no-color.org) or TERM is dumb."""
    if choice == "always":
        return True
    if choice == "never" or environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    return is_terminal(stream)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def terminal_size(stream: TextIO) -> tuple[int, int]:
    """(columns, rows) of the terminal `stream` writes to, asked of the terminal itself: a
    COLUMNS/LINES pair in the environment (which shutil prefers) is often inherited and
    stale, and a redraw cut to the wrong size scrolls."""
    try:
        size = os.get_terminal_size(stream.fileno())
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        pass
    columns, lines = shutil.get_terminal_size()
    return columns, lines


def cut(line: str, width: int) -> str:
    """`line` cut to `width` visible characters, SGR codes kept (and closed if cut)."""
    out, seen, pos, styled = [], 0, 0, False
    for m in _SGR.finditer(line):
        text = line[pos:m.start()]
        if seen + len(text) > width:
            break
        out.append(text)
        seen += len(text)
        out.append(m.group())
        styled = m.group() != RESET
        pos = m.end()
    else:
        text = line[pos:]
        if seen + len(text) <= width:
            return line
    out.append(text[:width - seen])
    return "".join(out) + (RESET if styled else "")


def fit(text: str, columns: int, rows: int) -> list[str]:
    """The lines of `text` that fit a columns x rows screen; the last row says what was
    left out."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) > rows:
        hidden = len(lines) - rows + 1
        lines = lines[:rows - 1] + [f"... {hidden} more lines (a larger window or a smaller --top)"]
    return [cut(line, columns) for line in lines]


def redraw(lines: list[str]) -> str:
    return HOME + "".join(line + CLEAR_LINE + "\n" for line in lines[:-1]) + \
        (lines[-1] + CLEAR_LINE if lines else "") + CLEAR_BELOW


def run(
    take: Callable[[], object],
    show: Callable[[object, object, object, int], str],
    *,
    interval: float,
    out: TextIO,
    terminal: bool,
    stop: threading.Event | None = None,
    failed: Callable[[Exception], str | None] = lambda e: None,
    monotonic: Callable[[], float] = time.monotonic,
    size: Callable[[], tuple[int, int]] | None = None,
    max_frames: int | None = None,
    gap: str = "\n",
) -> int:
    """Frames until `stop` is set or Ctrl-C (exit status 0).

    take() returns a frame; show(frame, last, start, number) its text (last and start are
    the frame itself the first time). Off a terminal, `gap` follows each frame (a blank
    line between text frames; nothing between JSON lines). `failed(exc)` turns an exception of take() into the
    text shown instead of a frame (None: re-raise); the loop then carries on and the next
    good frame is compared with the last good one.
    """
    stop = stop or threading.Event()
    size = size or (lambda: terminal_size(out))
    start = last = None
    number = 0
    next_at = monotonic()
    if terminal:
        out.write(HIDE_CURSOR)
    try:
        while not stop.is_set():
            try:
                frame = take()
            except Exception as e:  # noqa: BLE001 - failed() decides
                text = failed(e)
                if text is None:
                    raise
            else:
                number += 1
                if start is None:
                    start = last = frame
                text = show(frame, last, start, number)
                last = frame
            if terminal:
                columns, rows = size()
                out.write(redraw(fit(text, columns, rows)))
            else:
                out.write((text if text.endswith("\n") else text + "\n") + gap)
            out.flush()
            if max_frames is not None and number >= max_frames:
                break
            now = monotonic()
            next_at += interval
            if next_at < now:  # overran: skip the missed slots
                next_at += ((now - next_at) // interval + 1) * interval
            if stop.wait(next_at - now):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if terminal:
            out.write(SHOW_CURSOR + "\n")
            out.flush()
    return 0
