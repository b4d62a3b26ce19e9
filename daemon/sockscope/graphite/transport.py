"""The connection to carbon: graphyte's send seam over one persistent socket.

`Transport` keeps one TCP connection (or one connected UDP socket) until a send fails;
`probe()` looks at the TCP connection without blocking: EOF or a reset, the bytes carbon's
TCP has not acknowledged (SIOCOUTQ, `ss -tn` Send-Q) and the receive window carbon
advertises (tcp_info tcpi_snd_wnd, `ss -ti` snd_wnd), from which the Pusher decides what
carbon has read. `finish()` half-closes and waits for carbon's FIN (a clean close after
reading everything); `abort()` interrupts a blocked connect or send from another thread.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import time
from dataclasses import dataclass

import graphyte

__all__ = ["Probe", "Transport", "TCP_CHUNK_BYTES", "UDP_DATAGRAM_BYTES"]

# One TCP send. Small enough that a retried chunk repeats little.
TCP_CHUNK_BYTES = 32 * 1024
# One UDP datagram: fits an Ethernet frame over IPv6 (1500 - 40 - 28), like collectd's
# write_graphite buffer. A single longer line (at most lines.MAX_LINE_BYTES) goes alone.
UDP_DATAGRAM_BYTES = 1432
# SO_SNDBUF of the TCP socket (the kernel doubles it): bounds what a stalled carbon holds
# up in our kernel, and so what is written again after a failure.
SNDBUF_BYTES = 64 * 1024
# TCP keepalive on the carbon connection: after 1 s idle a probe every second, each answered
# with an ACK that carries carbon's current window (a window update carbon's kernel would
# otherwise not send), so what carbon read is confirmed between pushes.
KEEPALIVE_IDLE = 1
KEEPALIVE_INTERVAL = 1
# linux/sockios.h SIOCOUTQ (= TIOCOUTQ, asm-generic/ioctls.h 0x5411): on a TCP socket,
# bytes written and not yet acknowledged by the peer (write_seq - snd_una).
SIOCOUTQ = 0x5411
# include/uapi/linux/tcp.h struct tcp_info: __u32 tcpi_snd_wnd ("peer's advertised receive
# window after scaling") at byte 228, since Linux 5.4; an older kernel returns less.
TCPI_SND_WND_OFFSET = 228
TCP_INFO_BYTES = 256


@dataclass(frozen=True, slots=True)
class Probe:
    """One look at the TCP connection to carbon (Transport.probe)."""

    closed: bool  # EOF (carbon's FIN) or an error
    error: OSError | None  # e.g. ECONNRESET
    unacked: int  # SIOCOUTQ: bytes written and not acknowledged (`ss -tn` Send-Q)
    window: int | None  # carbon's advertised receive window; None before Linux 5.4


class Transport(graphyte.Sender):
    """graphyte's send seam (`send_message`) over ONE persistent socket.

    graphyte opens a connection per message; this keeps one TCP connection (or one
    connected UDP socket) until a send fails. Every call raises OSError on failure and
    leaves the transport disconnected; the Pusher decides about retries.
    """

    def __init__(self, host: str, port: int, protocol: str = "tcp", *,
                 sndbuf: int = SNDBUF_BYTES, keepalive_probes: int = 10) -> None:
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
        super().__init__(host, port, protocol=protocol)
        self.sndbuf = sndbuf
        # Unanswered keepalive probes before the kernel resets the connection (TCP_KEEPCNT,
        # 1-127): an idle carbon that vanished without a reset is noticed after about
        # KEEPALIVE_IDLE + probes x KEEPALIVE_INTERVAL seconds.
        self.keepalive_probes = max(1, min(127, keepalive_probes))
        self._sock: socket.socket | None = None
        self._connecting: socket.socket | None = None  # for abort()
        # Set by abort(): a socket shut down here reads as EOF, which must not pass for
        # carbon's clean close.
        self._aborted = False

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def chunk_bytes(self) -> int:
        return TCP_CHUNK_BYTES if self.protocol == "tcp" else UDP_DATAGRAM_BYTES

    def connect(self, timeout: float) -> None:
        self.close()
        kind = socket.SOCK_STREAM if self.protocol == "tcp" else socket.SOCK_DGRAM
        # getaddrinfo has no timeout; an IP literal (the usual case) never waits.
        infos = socket.getaddrinfo(self.host, self.port, type=kind)
        error: OSError | None = None
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            self._connecting = sock
            try:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.keepalive_probes)
                sock.settimeout(timeout)
                sock.connect(address)  # UDP: only fixes the peer (and gets ICMP errors back)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            finally:
                self._connecting = None
            self._sock = sock
            return
        raise error or OSError(f"no address for {self.host}:{self.port}")

    def probe(self) -> Probe:
        """The TCP connection's state, without blocking (carbon never writes, so a readable
        socket means EOF or an error)."""
        sock = self._sock
        if sock is None or self.protocol != "tcp":
            raise ConnectionError("no TCP connection")
        if self._aborted:
            return Probe(True, ConnectionAbortedError("aborted"), 0, None)
        closed, error = False, None
        try:
            # Non-blocking: with a timeout set, Python would wait for readability first.
            sock.settimeout(0.0)
            closed = sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except OSError as exc:
            closed, error = True, exc
        try:
            unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
        except OSError as exc:
            return Probe(True, error or exc, 0, None)
        window = (struct.unpack_from("I", info, TCPI_SND_WND_OFFSET)[0]
                  if len(info) >= TCPI_SND_WND_OFFSET + 4 else None)
        return Probe(closed, error, unacked, window)

    def finish(self, timeout: float) -> bool:
        """Half-close (our FIN after everything written) and wait up to `timeout` for
        carbon's FIN. True if it came with everything acknowledged and no reset: carbon
        reached EOF, i.e. read every byte (a socket closed with unread data resets instead).
        The connection is closed either way."""
        sock = self._sock
        if sock is None:
            return False
        deadline = time.monotonic() + timeout
        try:
            sock.shutdown(socket.SHUT_WR)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sock.settimeout(left)
                if sock.recv(65536) == b"":
                    break
            if self._aborted:
                return False
            # Our FIN takes one sequence number: 0 = every byte and the FIN acknowledged.
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0] == 0
        except OSError:
            return False
        finally:
            self.close()

    def send_message(self, message: bytes, timeout: float | None = None) -> None:
        """Send all of `message` (TCP) or one datagram (UDP) within `timeout` seconds."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        try:
            sock.settimeout(timeout)
            if self.protocol == "tcp":
                sock.sendall(message)  # the timeout bounds the whole call (Python >= 3.5)
            else:
                sent = sock.send(message)
                if sent != len(message):
                    raise OSError(f"datagram truncated: {sent} of {len(message)} bytes")
        except OSError:
            self.close()
            raise

    def abort(self) -> None:
        """From another thread: make a blocked connect or send fail at once (shutdown;
        the owner of the socket closes it)."""
        self._aborted = True
        for sock in (self._connecting, self._sock):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected (yet), or already closed by its owner

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def stop(self) -> None:  # graphyte.Sender.__del__ calls stop(); we have no thread
        self.close()
