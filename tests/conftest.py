"""Shared fixtures: network namespaces, a real socket mix inside them, ss figures.

Helpers live in the support package (tests/support/): `from support.prereq import
require, require_root`:

    require(condition, reason)   skip with reason locally; FAIL under CI=true
    require_root()               root + `ip` + `ss` (every namespace test needs them)

Fixtures:

    root             session-scoped: require_root()
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

import pytest

from support import sockmix as sockmix_mod
from support import ss_parse
from support.netns import NetNS, NetNSError
from support.prereq import require, require_root

SOCKMIX_READY_TIMEOUT = 30.0


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
