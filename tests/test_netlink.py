"""Decoder and Reader tests on recorded and hand-built netlink bytes (no root needed)."""

import errno
import os
import random
import socket
import struct

import numpy as np
import pytest

from sockscope import netlink
from sockscope.batch import Attribute, Batch, Record, encode_message, format_address
from sockscope.netlink import NLM_F_DUMP_INTR, NLM_F_MULTI, NetlinkError, Reader, decode_datagram
from support.ss_parse import parse as parse_ss

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SS_STATE = {
    1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
    6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing",
    12: "syn_recv",
}


def recorded_datagrams():
    """(family tag, bytes) per datagram of tests/fixtures/dump.bin (see record_netlink.py)."""
    with open(os.path.join(FIXTURES, "dump.bin"), "rb") as f:
        data = f.read()
    off = 0
    while off < len(data):
        length, tag = struct.unpack_from("<IB", data, off)
        off += 5
        yield tag, data[off:off + length]
        off += length


def rows(data: bytes, offsets: list[int]) -> list[tuple]:
    """The Record-order tuples of the socket messages decode_datagram found."""
    return list(Batch(bytes(data), np.array(offsets, np.int64) >> 2))


def decode_recorded():
    records, done = [], []
    for tag, dgram in recorded_datagrams():
        seq = 1 if tag == 4 else 2
        offsets: list[int] = []
        res = decode_datagram(dgram, len(dgram), seq, offsets)
        records += rows(dgram, offsets)
        if res.done:
            done.append(tag)
    return [Record._make(r) for r in records], done


def test_recorded_dump_equals_ss_lines():
    records, done = decode_recorded()
    assert done == [4, 6], "each family's dump must end with NLMSG_DONE"
    with open(os.path.join(FIXTURES, "dump.ss")) as f:
        ss_lines = parse_ss(f.read())
    ours = sorted(
        (SS_STATE[r.state], format_address(r.family, r.src), r.sport,
         format_address(r.family, r.dst), r.dport, r.rqueue, r.wqueue)
        for r in records
    )
    theirs = sorted(
        (ln.state, ln.local_address, ln.local_port, ln.remote_address, ln.remote_port,
         ln.recvq, ln.sendq)
        for ln in ss_lines
    )
    assert ours == theirs
    assert len(ours) == 9


def test_recorded_dump_facts():
    records, _ = decode_recorded()
    by_state = {}
    for r in records:
        by_state.setdefault(r.state, []).append(r)
    (tw,) = by_state[6]
    assert (tw.inode, tw.uid) == (0, 0)  # TIME-WAIT carries no owner
    listen = {r.sport: r for r in by_state[10]}
    assert (listen[18080].rqueue, listen[18080].wqueue) == (1, 8)  # 1 queued, backlog 8
    assert listen[18081].family == socket.AF_INET6 and listen[18081].wqueue == 16
    assert all(r.inode for r in by_state[10])


# --- hand-built messages -------------------------------------------------------------

HDR = struct.Struct("=IHHII")


def sock_msg(seq, *, state=1, family=socket.AF_INET, sport=80, dport=40000, rq=0, wq=0,
             inode=7, flags=NLM_F_MULTI, attrs=b"", mtype=20):
    src = socket.inet_pton(family, "127.0.0.1" if family == socket.AF_INET else "::1")
    src = src.ljust(16, b"\0")
    body = struct.pack("=BBBB", family, state, 0, 0)
    body += struct.pack(">HH", sport, dport) + src + src + struct.pack("=III", 0, 0, 0)
    body += struct.pack("=IIIII", 0, rq, wq, 1000, inode) + attrs
    return HDR.pack(16 + len(body), mtype, flags, seq, 0) + body


def done_msg(seq, err=0, flags=NLM_F_MULTI):
    return HDR.pack(20, 3, flags, seq, 0) + struct.pack("=i", err)


def error_msg(seq, err):
    return HDR.pack(36, 2, 0, seq, 0) + struct.pack("=i", err) + HDR.pack(72, 20, 0x301, seq, 0)


def decode(data, seq=5):
    offsets: list[int] = []
    res = decode_datagram(data, len(data), seq, offsets)
    return rows(data, offsets), res


def test_decode_ports_queues_and_attribute_padding():
    # Attributes of odd length are padded to 4 bytes: the next message must still parse.
    attr = struct.pack("=HH", 5, 1) + b"\x01" + b"\0\0\0"
    data = sock_msg(5, sport=8080, dport=443, rq=10, wq=20, attrs=attr) + sock_msg(5, sport=1)
    out, res = decode(data)
    assert [(r[2], r[3], r[6], r[7]) for r in out] == [(8080, 443, 10, 20), (1, 40000, 0, 0)]
    assert not res.done


def test_decode_skips_other_sequence_numbers():
    out, res = decode(sock_msg(4) + sock_msg(5, sport=99) + done_msg(5))
    assert [r[2] for r in out] == [99]
    assert res.done


def test_dump_intr_flag_is_reported():
    out, res = decode(sock_msg(5, flags=NLM_F_MULTI | NLM_F_DUMP_INTR) + done_msg(5))
    assert res.interrupted and res.done and len(out) == 1


def test_error_in_done_payload():
    with pytest.raises(NetlinkError, match="NLMSG_DONE.*ENOENT") as e:
        decode(done_msg(5, -errno.ENOENT))
    assert e.value.errno == errno.ENOENT


def test_nlmsg_error():
    with pytest.raises(NetlinkError, match="EINVAL") as e:
        decode(error_msg(5, -errno.EINVAL))
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "data, match",
    [
        (sock_msg(5)[:-10], "garbled message"),  # length beyond the datagram
        (HDR.pack(8, 20, 0, 5, 0) + b"\0" * 8, "garbled message"),  # length < header
        (HDR.pack(40, 20, 0, 5, 0) + b"\0" * 24, "truncated inet_diag_msg"),
        (sock_msg(5) + b"\0" * 7, "trailing bytes"),
        (HDR.pack(16, 2, 0, 5, 0), "truncated NLMSG_ERROR"),
        (HDR.pack(16, 77, 0, 5, 0), "unexpected message type 77"),
    ],
)
def test_garbled_input_raises_clear_error(data, match):
    with pytest.raises(NetlinkError, match=match):
        decode(data)


def test_decoder_never_loops_on_random_bytes():
    # Whatever the bytes, decoding ends (offset always advances) with records or an error.
    rnd = __import__("random").Random(1)
    for _ in range(2000):
        n = rnd.randrange(0, 400)
        data = bytes(rnd.randrange(256) for _ in range(n))
        try:
            decode(data)
        except NetlinkError:
            pass


# --- Reader with a scripted socket -----------------------------------------------------


class ScriptedSocket:
    """Answers each dump request with the next scripted list of datagrams (or an exception)."""

    def __init__(self, script):
        self.script = script  # shared by every socket the reader opens
        self.pending = []
        self.sent = []
        self.closed = False

    def settimeout(self, t):
        self.timeout = t

    def send(self, data):
        seq = struct.unpack_from("=I", data, 8)[0]
        self.sent.append((data[16], seq))
        step = self.script.pop(0)
        self.pending = [d(seq) if callable(d) else d for d in step]

    def recv_into(self, buf, n, flags):
        item = self.pending.pop(0)
        if isinstance(item, BaseException):
            raise item
        buf[: len(item)] = item
        return len(item)

    def close(self):
        self.closed = True


def scripted_reader(script, families=("ipv4",), **kw):
    socks = []

    def opener(netns):
        s = ScriptedSocket(script)
        socks.append(s)
        return s

    return Reader(families, open_socket=opener, **kw), socks


def collecting():
    batches = []

    def start():
        batches.clear()
        return batches.append

    return batches, start


def test_reader_multipart_dump_across_datagrams():
    reader, _ = scripted_reader([[
        lambda s: sock_msg(s, sport=1) + sock_msg(s, sport=2),
        lambda s: sock_msg(s, sport=3),
        lambda s: done_msg(s),
    ]])
    batches, start = collecting()
    stats = reader.poll(start)
    assert [r[2] for b in batches for r in b] == [1, 2, 3]
    assert (stats.messages, stats.retries, stats.interrupted) == (3, 0, 0)


def test_reader_batches_wrap_its_buffer_and_a_kept_batch_keeps_its_bytes(monkeypatch):
    """Batches are views of the receive buffer (no copy per batch): while no sink keeps one
    the reader receives every batch into the same buffer; a kept batch keeps its buffer,
    and the reader goes on in a new one, so what was kept still reads right."""
    monkeypatch.setattr(netlink, "RECV_BUFFER", 4096)
    monkeypatch.setattr(netlink, "RECV_ROOM", 3000)
    chunk = lambda first: lambda s: b"".join(sock_msg(s, sport=p) for p in range(first, first + 20))  # noqa: E731
    script = [chunk(1), chunk(21), chunk(41), lambda s: done_msg(s)]  # ~2 KiB each: a batch per datagram
    seen: list[int] = []

    def counting():
        return lambda batch: seen.extend(batch.sport.tolist())

    reader, _ = scripted_reader([script, script])
    reader.poll(counting)
    assert seen == list(range(1, 61))
    assert reader.buffers == 1  # every batch in the one buffer

    kept, start = collecting()
    reader.poll(start)
    assert [len(b) for b in kept] == [20, 20, 20]
    assert reader.buffers == 4  # a new one after each kept batch
    assert [r[2] for b in kept for r in b] == list(range(1, 61))  # nothing overwritten


def test_reader_retries_interrupted_dump_then_accepts_and_counts():
    intr = lambda s: sock_msg(s, flags=NLM_F_MULTI | NLM_F_DUMP_INTR) + done_msg(s)  # noqa: E731
    reader, _ = scripted_reader([[intr], [intr], [lambda s: sock_msg(s) + done_msg(s)]],
                                dump_retries=3)
    stats = reader.poll(collecting()[1])
    assert (stats.retries, stats.interrupted) == (2, 0)

    reader, _ = scripted_reader([[intr]] * 3, dump_retries=2)
    batches, start = collecting()
    stats = reader.poll(start)
    assert (stats.retries, stats.interrupted) == (2, 1)
    assert sum(len(b) for b in batches) == 1  # only the last attempt's records are kept


def test_reader_retries_enobufs_on_a_fresh_socket():
    reader, socks = scripted_reader([
        [OSError(errno.ENOBUFS, "No buffer space available")],
        [lambda s: sock_msg(s) + done_msg(s)],
    ])
    stats = reader.poll(collecting()[1])
    assert stats.retries == 1 and stats.messages == 1
    assert socks[0].closed and len(socks) == 2


def test_reader_eintr_is_retried():
    reader, _ = scripted_reader([[InterruptedError(), lambda s: sock_msg(s) + done_msg(s)]])
    assert reader.poll(collecting()[1]).messages == 1


def test_reader_timeout_is_a_clear_error_and_closes_the_socket():
    reader, socks = scripted_reader([[socket.timeout()]], timeout=0.5)
    with pytest.raises(NetlinkError, match="no answer from the kernel within 0.5 s"):
        reader.poll(collecting()[1])
    assert socks[0].closed and reader._sock is None


def test_reader_skips_ipv6_when_the_kernel_cannot_dump_it(caplog):
    reader, _ = scripted_reader(
        [[lambda s: sock_msg(s) + done_msg(s)], [lambda s: done_msg(s, -errno.ENOENT)],
         [lambda s: sock_msg(s) + done_msg(s)]],
        families=("ipv4", "ipv6"), legacy=False,
    )
    stats = reader.poll(collecting()[1])
    assert stats.families == ("ipv4",)
    assert "IPv6 sockets cannot be dumped" in caplog.text
    # Later polls do not ask again.
    assert reader.poll(collecting()[1]).families == ("ipv4",)


def test_reader_other_errors_propagate():
    reader, _ = scripted_reader([[lambda s: error_msg(s, -errno.EPERM)]])
    with pytest.raises(NetlinkError, match="EPERM"):
        reader.poll(collecting()[1])


def test_request_layout():
    req = netlink.build_request(socket.AF_INET6, 42)
    length, mtype, flags, seq, pid = HDR.unpack_from(req)
    assert (length, mtype, flags, seq, pid) == (72, 20, 0x301, 42, 0)
    fam, proto, ext, _pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (fam, proto, ext, states) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 0xFFF)


def test_missing_namespace_is_an_error_not_a_creation(tmp_path):
    path = str(tmp_path / "no-such-netns")
    reader = Reader(("ipv4",), netns=path)
    with pytest.raises(NetlinkError, match="no-such-netns"):
        reader.poll(collecting()[1])
    assert not os.path.exists(path)


# --- legacy TCPDIAG_GETSOCK dump and the batched column decoder -------------------------


def test_legacy_request_layout():
    req = netlink.build_legacy_request(42)
    length, mtype, flags, seq, pid = HDR.unpack_from(req)
    assert (length, mtype, flags, seq, pid) == (76, 18, 0x301, 42, 0)
    fam, src_len, dst_len, ext = struct.unpack_from("=BBBB", req, 16)
    assert (fam, src_len, dst_len, ext) == (socket.AF_UNSPEC, 0, 0, 0)
    assert req[20:68] == bytes(48)  # zero sockid: no filter
    assert struct.unpack_from("=II", req, 68) == (0xFFF, 0)


def legacy_msg(seq, **kw):
    return sock_msg(seq, mtype=18, **kw)


def test_both_families_use_one_legacy_dump():
    reader, socks = scripted_reader([[
        lambda s: legacy_msg(s, sport=1) + legacy_msg(s, sport=2, family=socket.AF_INET6),
        lambda s: legacy_msg(s, sport=3) + done_msg(s),
    ]], families=("ipv4", "ipv6"))
    batches, start = collecting()
    stats = reader.poll(start)
    assert [(r[0], r[2]) for b in batches for r in b] == [
        (socket.AF_INET, 1), (socket.AF_INET6, 2), (socket.AF_INET, 3)]
    assert stats.families == ("ipv4", "ipv6") and stats.messages == 3
    assert [family for family, _ in socks[0].sent] == [socket.AF_UNSPEC]


def test_legacy_refused_falls_back_to_per_family_dumps(caplog):
    reader, socks = scripted_reader([
        [lambda s: error_msg(s, -errno.EINVAL)],
        [lambda s: sock_msg(s, sport=1) + done_msg(s)],
        [lambda s: sock_msg(s, sport=2, family=socket.AF_INET6) + done_msg(s)],
        [lambda s: sock_msg(s, sport=3) + done_msg(s)],
        [lambda s: done_msg(s)],
    ], families=("ipv4", "ipv6"))
    batches, start = collecting()
    stats = reader.poll(start)
    assert [r[2] for b in batches for r in b] == [1, 2]
    assert stats.families == ("ipv4", "ipv6") and stats.retries == 0
    assert "refused a TCPDIAG_GETSOCK dump" in caplog.text
    reader.poll(start)  # later polls do not ask again
    sent = [family for s in socks for family, _ in s.sent]
    assert sent == [socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6, socket.AF_INET,
                    socket.AF_INET6]


def test_legacy_other_errors_are_not_a_fallback():
    reader, _ = scripted_reader([[lambda s: error_msg(s, -errno.EPERM)]],
                                families=("ipv4", "ipv6"))
    with pytest.raises(NetlinkError, match=r"ipv4\+ipv6.*EPERM"):
        reader.poll(collecting()[1])
    assert not reader._legacy_refused


def many_messages(seq, n, rnd, **kw):
    """n socket messages of mixed sizes (attributes), families and states."""
    out = b""
    for i in range(n):
        attrs = rnd.choice([b"", struct.pack("=HH", 5, 1) + b"\x01\0\0\0",
                            struct.pack("=HHQ", 12, 21, i)])
        out += sock_msg(seq, state=rnd.choice([1, 6, 8, 10]), sport=rnd.randrange(65536),
                        dport=rnd.randrange(65536), rq=rnd.randrange(1 << 32),
                        wq=rnd.randrange(3), inode=i,
                        family=rnd.choice([socket.AF_INET, socket.AF_INET6]),
                        attrs=attrs, **kw)
    return out


def exact(datagrams, seq):
    out = []
    for d in datagrams:
        offsets: list[int] = []
        decode_datagram(d, len(d), seq, offsets)
        out += rows(d, offsets)
    return out


def test_batched_columns_equal_the_exact_decoder():
    script = [lambda s, k=k: many_messages(s, 40 + k, random.Random(k)) for k in range(60)]
    script.append(lambda s: many_messages(s, 5, random.Random(99)) + done_msg(s))
    reader, socks = scripted_reader([script])
    batches, start = collecting()
    stats = reader.poll(start)
    seq = socks[0].sent[0][1]
    want = exact([step(seq) for step in script], seq)
    assert [tuple(r) for b in batches for r in b] == want
    assert stats.messages == len(want) == sum(40 + k for k in range(60)) + 5
    # Many datagrams arrive per batch: the header scan carried the bulk.
    assert len(batches) < 10 and max(len(b) for b in batches) > 500


@pytest.mark.parametrize("spoil", ["other_seq", "dump_intr", "lookalike", "short"])
def test_batches_with_anything_unusual_take_the_exact_path(spoil):
    seq = 5
    good = many_messages(seq, 30, random.Random(1))
    if spoil == "other_seq":
        odd = sock_msg(seq + 1, sport=4242)
    elif spoil == "dump_intr":
        odd = sock_msg(seq, sport=4242, flags=NLM_F_MULTI | NLM_F_DUMP_INTR)
    elif spoil == "lookalike":
        # An attribute whose payload looks like a header of this dump: the chain check
        # must reject the false candidate.
        fake = HDR.pack(88, 20, NLM_F_MULTI, seq, 0)
        odd = sock_msg(seq, sport=4242, attrs=struct.pack("=HH", 20, 99) + fake)
    else:
        odd = HDR.pack(40, 20, NLM_F_MULTI, seq, 0) + bytes(24)  # shorter than a message
    data = good + odd + good
    bounds = [len(good), len(good) + len(odd), len(data)]
    assert netlink.scan_batch(data, bounds, seq, 20) is None
    assert netlink.scan_batch(good + good, [len(good), 2 * len(good)], seq, 20) is not None
    # A datagram that does not start on a message boundary of the chain is not plain.
    assert netlink.scan_batch(good + good, [len(good) - 4, 2 * len(good)], seq, 20) is None

    reader, _ = scripted_reader([[lambda s: good, lambda s: odd, lambda s: good,
                                  lambda s: done_msg(s)]], dump_retries=0)
    reader._seq = iter([seq])
    batches, start = collecting()
    if spoil == "short":
        with pytest.raises(NetlinkError, match="truncated inet_diag_msg"):
            reader.poll(start)
        return
    stats = reader.poll(start)
    got = [tuple(r) for b in batches for r in b]
    assert got == exact([good, odd, good], seq)
    assert (4242 in [r[2] for r in got]) == (spoil != "other_seq")
    assert stats.interrupted == (spoil == "dump_intr")


def test_ipv6_disabled_kernel_reads_ipv4_only(monkeypatch, caplog):
    monkeypatch.setattr(netlink, "ipv6_in_kernel", lambda: False)
    reader, socks = scripted_reader([[lambda s: sock_msg(s) + done_msg(s)]],
                                    families=("ipv4", "ipv6"))
    stats = reader.poll(collecting()[1])
    assert stats.families == ("ipv4",)
    # Not the legacy both-families request: a per-family AF_INET dump.
    assert socks[0].sent[0][0] == socket.AF_INET
    assert "IPv6 is disabled in this kernel" in caplog.text


def test_attribute_layouts_confirmed_at_once_equal_the_walk_of_each_message():
    """Batch.attributes learns a message's layout and confirms it on the others by their
    length and header words; whatever the messages hold (several layouts, repeated types,
    a garbled length, trailing bytes, none), it must find exactly what walking every
    message finds."""

    rng = random.Random(7)
    layouts = [[(8, b"\0"), (15, b"\6\0\0\0"), (21, b"\1" * 8), (2, b"\2" * 232)],
               [(8, b"\0"), (11, b"\1"), (15, b"\6\0\0\0"), (21, b"\1" * 8), (2, b"\2" * 232)],
               [(2, b"\3" * 104)], [], [(2, b"\4" * 8), (2, b"\5" * 16)], [(4, b"\1" * 72), (8, b"\0")]]
    for trial in range(40):
        msgs = []
        for _ in range(rng.randint(1, 60)):
            attrs = rng.choice(layouts)
            m = bytearray(encode_message((2, 1, 1, 2, bytes(16), bytes(16), 0, 0, 0, 1), attributes=attrs))
            r = rng.random()
            if r < 0.05 and len(m) > 92:  # a garbled nla_len somewhere in the chain
                at = 88 + 4 * rng.randrange((len(m) - 88) // 4)
                struct.pack_into("=H", m, at, rng.choice((0, 2, 3, 5000)))
            elif r < 0.1:  # trailing bytes after the last attribute, counted in nlmsg_len
                m += b"\0" * rng.choice((2, 4, 8))
                struct.pack_into("=I", m, 0, len(m) + (-len(m) % 4))
                m += b"\0" * (-len(m) % 4)
            msgs.append(bytes(m))
        data = b"".join(msgs)
        words = np.cumsum([0] + [len(m) >> 2 for m in msgs[:-1]])
        fast = Batch(data, words).attributes((2, 8, 11, 99))
        slow = Batch(data, words)
        want = {t: Attribute(np.full(len(msgs), -1, np.int64), np.zeros(len(msgs), np.int64)) for t in (2, 8, 11, 99)}
        slow._walk_rows(np.arange(len(msgs)), want)
        for t in want:
            assert fast[t].offset.tolist() == want[t].offset.tolist(), (trial, t)
            assert fast[t].length.tolist() == want[t].length.tolist(), (trial, t)
