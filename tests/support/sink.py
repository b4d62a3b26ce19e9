"""A fake carbon for the pusher tests: a loopback TCP server recording the lines it reads
(tests/test_graphite.py, tests/test_graphite_e2e.py)."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time


class Sink:
    """A loopback TCP server, a fake carbon, that records every complete line it reads;
    like carbon, a partial line left when a connection ends is discarded.

    read_after=S: accepts but reads nothing for the first S seconds (a blackhole that
    recovers); reading=False: reads nothing until resume(), which first resets every
    connection it holds (a carbon killed with our bytes unread). reset_after=N: each of the
    first `resets` connections reads N bytes, then resets (SO_LINGER 0). read_bytes and
    read_pause make a slow reader. `lock` is held while a received block is parsed, so
    under it `distinct` holds every line read so far."""

    def __init__(self, port: int = 0, *, read_after: float = 0.0, rcvbuf: int = 0, reading: bool = True,
                 reset_after: int = 0, resets: int = 0, read_bytes: int = 65536, read_pause: float = 0.0):
        self.lines: list[str] = []
        self.distinct: set[str] = set()
        self.lock = threading.Lock()
        self.connections = 0
        self.read_from = time.monotonic() + read_after
        self.reading = reading
        self.reset_after, self.resets = reset_after, resets
        self.read_bytes, self.read_pause = read_bytes, read_pause
        self._generation = 0  # resume() bumps it: older connections reset
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            threading.Thread(target=self._read, args=(conn, self.connections, self._generation),
                             daemon=True).start()

    def resume(self):
        """Reset every connection held so far, then read normally."""
        self._generation += 1
        self.reading = True

    def _read(self, conn, number, generation):
        buf, got = b"", 0
        resetting = number <= self.resets
        with conn:
            conn.setblocking(False)
            while not self._stop.is_set():
                if generation != self._generation:
                    break  # resume(): reset
                if time.monotonic() < self.read_from or not self.reading:
                    time.sleep(0.02)
                    continue
                if not select.select([conn], [], [], 0.05)[0]:
                    continue
                want = min(self.read_bytes, self.reset_after - got) if resetting else self.read_bytes
                with self.lock:
                    try:
                        data = conn.recv(want)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return  # EOF: the partial line is discarded; closing sends our FIN
                    got += len(data)
                    buf += data
                    *complete, buf = buf.split(b"\n")
                    for line in complete:
                        self.lines.append(line.decode())
                        self.distinct.add(line.decode())
                if resetting and got >= self.reset_after:
                    time.sleep(0.1)  # more arrives, unread
                    break
                if self.read_pause:
                    time.sleep(self.read_pause)
            # Reset rather than close: a carbon killed, or closing with bytes unread.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self):
        self._stop.set()
        self.listener.close()
        self._thread.join(2)
