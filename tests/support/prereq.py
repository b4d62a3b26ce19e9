"""Missing prerequisites: a skip with the reason locally, a failure under CI=true (where
nothing may be skipped for a missing tool or privilege)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(condition: bool, reason: str) -> None:
    """A missing prerequisite: pytest.fail under CI=true, pytest.skip (with the reason
    printed) otherwise. Usable in tests and fixtures."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing under CI=true: {reason}", pytrace=False)
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def root_reason() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, ip netns exec)"
    for tool, pkg in (("ip", "iproute2"), ("ss", "iproute2")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` ({pkg}) on PATH"
    return None


def require_root() -> None:
    reason = root_reason()
    require(reason is None, reason or "")
