"""Run a function in a forked child (to drop privileges, unshare, ... without touching the
test process) and get its JSON-able result back."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable


def in_child(work: Callable[[], object]) -> object:
    """`work()` in a forked child, its result through a pipe as JSON. Whatever the child
    raises fails the caller's assertion with the child's traceback; the child never
    returns into pytest (os._exit)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(work()).encode())
            code = 0
        except BaseException:  # noqa: BLE001 - the forked child reports anything, then _exit
            os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data.decode()
    return json.loads(data)
