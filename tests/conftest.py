"""Shared fixtures: network namespaces, a real socket mix inside them, ss figures.

Helpers (import them in test modules: `from conftest import require` works because this
directory is on sys.path, or use the `root` fixture / `require_root()`):

    require(condition, reason)   skip with reason locally; FAIL under CI=true
    require_root()               root + `ip` + `ss` (every namespace test needs them)

Fixtures:

    netns            module-scoped NetNS (.name, .path, .run(cmd), .popen(cmd)); deleted
                     at teardown, also on failure
    netns_factory    function-scoped: make_ns(sysctls=None) -> a fresh NetNS, all deleted
                     after the test
    sockmix          module-scoped SockMixProcess running sockmix.DEFAULT_SPEC (every
                     state) in `netns`; .ready, .group(kind, port), .expect_local,
                     .expect_remote, .ns; stopped by PID at teardown
    sockmix_factory  function-scoped: start(spec, ns=None) -> SockMixProcess; ns=None
                     makes a fresh namespace for it; all stopped/deleted after the test
    ss_figures       the function ss_parse.ss_figures(ns, exclude=..., include=...)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sockmix as sockmix_mod  # noqa: E402
import ss_parse  # noqa: E402
from netns import NetNS, NetNSError  # noqa: E402

SOCKMIX_READY_TIMEOUT = 30.0


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


def _new_netns(sysctls: dict[str, str] | None = None) -> NetNS:
    require_root()
    try:
        return NetNS.create(sysctls=sysctls)
    except NetNSError as e:
        # e.g. a container without CAP_SYS_ADMIN: a missing prerequisite, not a bug
        require(False, f"cannot create a network namespace: {e}")
        raise  # unreachable


@pytest.fixture(scope="session")
def root():
    """Depend on this (or call require_root()) in any test that needs root + iproute2."""
    require_root()


@pytest.fixture(scope="module")
def netns():
    ns = _new_netns()
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def netns_factory():
    made: list[NetNS] = []

    def make(sysctls: dict[str, str] | None = None) -> NetNS:
        ns = _new_netns(sysctls)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.delete()


def _start(ns: NetNS, spec: dict | None) -> sockmix_mod.SockMixProcess:
    try:
        return sockmix_mod.start(ns, spec, timeout=SOCKMIX_READY_TIMEOUT)
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def sockmix(netns):
    mix = _start(netns, None)
    try:
        yield mix
    finally:
        mix.stop()


@pytest.fixture
def sockmix_factory(netns_factory):
    started: list[sockmix_mod.SockMixProcess] = []

    def start(spec: dict | None = None, ns: NetNS | None = None) -> sockmix_mod.SockMixProcess:
        mix = _start(ns if ns is not None else netns_factory(), spec)
        started.append(mix)
        return mix

    try:
        yield start
    finally:
        for mix in started:
            mix.stop()


@pytest.fixture
def ss_figures():
    return ss_parse.ss_figures
