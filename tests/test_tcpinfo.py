"""tcpinfo: struct tcp_info fields from sock_diag's INET_DIAG_INFO, column-wise.

The layout is checked against the kernel itself: the same socket's getsockopt(TCP_INFO)
returns the same struct, so every field must agree between the two (read at one moment,
on a connection that holds still). A shorter struct (an older kernel) is read as far as it
goes: the fields past its end are absent, not garbage.
"""

from __future__ import annotations

import socket
import struct
import time

import numpy as np

from sockscope import tcpinfo
from sockscope.batch import Batch
from sockscope.netlink import Reader

STILL = ["bytes_acked", "bytes_received", "snd_mss", "rcv_mss", "segs_out", "segs_in", "rtt",
         "rttvar", "min_rtt", "snd_cwnd", "total_retrans", "data_segs_out", "bytes_sent",
         "rcv_wnd", "snd_wnd", "busy_time", "delivered", "pmtu", "advmss", "state"]


def test_every_field_equals_getsockopt_tcp_info_of_the_same_socket():
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    try:
        client.sendall(b"x" * 200_000)
        got = b""
        while len(got) < 200_000:
            got += server.recv(65536)
        server.sendall(b"y" * 1234)
        assert len(client.recv(4096)) == 1234
        time.sleep(0.05)  # every ACK in: nothing moves any more
        raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
        want = {n: int(np.frombuffer(raw, tcpinfo.FIELDS[n].dtype, 1, tcpinfo.FIELDS[n].offset)[0])
                for n in STILL}
        found = []

        def start():
            def sink(batch):
                cols, ok = tcpinfo.columns(batch, STILL)
                for i in np.flatnonzero((batch.sport == client.getsockname()[1]) & ok):
                    found.append({n: int(cols[n][i]) for n in STILL})
            return sink

        with Reader(("ipv4",), ext=tcpinfo.INFO_EXT, legacy=False) as reader:
            reader.poll(start)
    finally:
        for s in (client, server, srv):
            s.close()
    assert found == [want]
    assert want["bytes_acked"] == 200_001 and want["bytes_received"] == 1234  # +1: the SYN
    assert want["state"] == 1


def _info(**fields) -> bytes:
    buf = bytearray(280)
    for name, value in fields.items():
        f = tcpinfo.FIELDS[name]
        struct.pack_into("=" + {"u1": "B", "u4": "I", "u8": "Q"}[f.dtype], buf, f.offset, value)
    return bytes(buf)


def test_a_shorter_struct_is_read_as_far_as_it_goes():
    rec = (socket.AF_INET, 1, 80, 4000, bytes(16), bytes(16), 0, 0, 0, 1)
    full = _info(rtt=1500, busy_time=10**6, bytes_received=7)
    old = full[:104]  # a 2.6-era kernel: nothing from pacing_rate on
    batch = Batch.from_records([rec] * 4, attributes=[
        [(tcpinfo.INET_DIAG_INFO, full)], [(tcpinfo.INET_DIAG_INFO, old)], [], [(99, full)]])
    cols, ok = tcpinfo.columns(batch, ["rtt"])
    assert ok.tolist() == [True, True, False, False] and cols["rtt"].tolist() == [1500, 1500, 0, 0]
    cols, ok = tcpinfo.columns(batch, ["rtt", "busy_time", "bytes_received"])
    assert ok.tolist() == [True, False, False, False]
    assert (cols["busy_time"][0], cols["bytes_received"][0]) == (10**6, 7)
    assert cols["busy_time"][1] == 0  # absent, not read past the struct's end
