"""Log each distinct problem of one thing once, and its recovery once.

A failure that repeats every poll (a namespace gone, a /proc file unreadable, carbon
down) must not write a line per poll, and its end must be visible. `Problems` remembers
the messages it logged since the last success (bounded; forgets them all when full, so a
problem that keeps changing its text is still logged at most every MAX_REMEMBERED
distinct messages) and logs one line when the thing works again.
"""

from __future__ import annotations

import logging

__all__ = ["Problems", "MAX_MESSAGE", "MAX_REMEMBERED", "clip"]

MAX_MESSAGE = 500  # characters of a message kept and logged
MAX_REMEMBERED = 64  # distinct messages remembered as logged


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Problems:
    """`failed()` each time `what` fails, `ok()` each time it works. Lines read
    "<what>: <message>" (just the message when `what` is empty)."""

    def __init__(self, logger: logging.Logger, what: str, *, level: int = logging.ERROR,
                 recovery: str = "{what}: recovered after {n} failures") -> None:
        self._log = logger
        self.what = what
        self._level = level
        self._recovery = recovery
        self._logged: set[str] = set()
        self.failures = 0  # since the last success

    def failed(self, problem: BaseException | str, *, traceback: BaseException | None = None) -> str:
        """Count a failure and log its message if not logged since the last success.
        Returns the message (clipped). `traceback`: an exception whose traceback goes with
        the line (unexpected exceptions; never for expected conditions)."""
        text = problem if isinstance(problem, str) else (str(problem) or type(problem).__name__)
        message = clip(text)
        self.failures += 1
        if message not in self._logged:
            if len(self._logged) >= MAX_REMEMBERED:
                self._logged.clear()
            self._logged.add(message)
            if self.what:
                self._log.log(self._level, "%s: %s", self.what, message, exc_info=traceback)
            else:
                self._log.log(self._level, "%s", message, exc_info=traceback)
        return message

    def ok(self) -> None:
        if self.failures:
            self._log.info("%s", self._recovery.format(what=self.what, n=self.failures))
            self.failures = 0
            self._logged.clear()
