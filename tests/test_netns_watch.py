"""Watching another network namespace: it vanishes, comes back, and is never created."""

import os
import socket

import pytest

from sockscope.aggregate import Rules
from sockscope.features.tcp import TcpSockets
from sockscope.netlink import NetlinkError, Reader
from sockscope.poller import Poller
from support.netns import NetNS


def test_vanishing_namespace_is_a_counted_poll_error_then_recovers(netns_factory):
    ns = netns_factory()
    name = ns.name
    listener = ns.popen(["python3", "-c", (
        "import socket, sys; s = socket.create_server(('127.0.0.1', 18099)); "
        "print('up', flush=True); sys.stdin.read()")],
        stdin=-1, stdout=-1, text=True)
    assert listener.stdout.readline().strip() == "up"
    poller = Poller([TcpSockets(Rules())], {socket.IPPROTO_TCP: Reader(netns=name)}, 5.0)
    st = poller.poll()
    assert st.errors == 0
    assert st.snapshot.states[("ipv4", "listen")] == 1

    ns.delete()  # stops the listener (by PID) and deletes the namespace
    st = poller.poll()
    assert st.errors == 1
    assert name in st.last_error
    assert st.snapshot.states[("ipv4", "listen")] == 1  # last good snapshot kept
    assert not os.path.exists(f"/run/netns/{name}")  # never re-created by sockscope

    again = NetNS.create(name=name)
    try:
        st = poller.poll()
        assert st.errors == 1 and st.last_error is None
        # A fresh namespace: the old listener (pinned by a stale socket) must not show.
        assert st.snapshot.states[("ipv4", "listen")] == 0
    finally:
        for reader in poller.readers.values():
            reader.close()
        again.delete()


def test_missing_namespace_by_name(root):
    reader = Reader(netns="sockscope-test-does-not-exist")
    with pytest.raises(NetlinkError, match="sockscope-test-does-not-exist"):
        reader.poll(lambda: (lambda records: None))
    assert not os.path.exists("/run/netns/sockscope-test-does-not-exist")


def test_replaced_namespace_is_noticed(netns_factory):
    """`ip netns del` + `ip netns add` between two polls: read the new namespace, not the
    old one that our open socket (and a process still in it) keep alive."""
    import subprocess

    ns = netns_factory()
    # Started outside NetNS.popen so that deleting the namespace does not stop it.
    listener = subprocess.Popen(ns.exec_argv(["python3", "-c", (
        "import socket, sys; s = socket.create_server(('127.0.0.1', 18099)); "
        "print('up', flush=True); sys.stdin.read()")]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        reader = Reader(netns=ns.name)
        poller = Poller([TcpSockets(Rules())], {socket.IPPROTO_TCP: reader}, 5.0)
        assert poller.poll().snapshot.states[("ipv4", "listen")] == 1
        subprocess.run(["ip", "netns", "del", ns.name], check=True)
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        st = poller.poll()
        assert st.errors == 0
        assert st.snapshot.states[("ipv4", "listen")] == 0
        reader.close()
    finally:
        listener.kill()  # our own child, by PID
        listener.wait(timeout=10)
