"""A long-running measuring process: `python -m bench.probe floor|sockscope`.

Reads one command per stdin line ("run"), answers one JSON line: CPU (user+sys, from
time.process_time) and wall time of one poll, the socket count it saw, and the
process's peak RSS so far (VmHWM). Being long-running, it measures what a daemon
pays per poll (imports, buffers and the netlink socket are set up once).

  floor      the one-walk floor: a bare receive loop of one TCPDIAG_GETSOCK dump (both
             families in one walk of the kernel's tables: the request sockscope sends)
             that does nothing with the bytes (it only looks for NLMSG_DONE).
  sockscope  sockscope.poller.poll_once() with the default rules: dump, decode,
             aggregate into a Snapshot. Also returns the Snapshot's state totals.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

NLMSG_DONE = 3
_TAIL = struct.Struct("=IH")
_HEAD = struct.Struct("=IH")


class Floor:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)
        self.buf = bytearray(1 << 20)
        self.seq = 1

    def run(self) -> dict:
        self.seq += 1
        # nlmsghdr + legacy inet_diag_req (type TCPDIAG_GETSOCK 18: AF_UNSPEC, no ext, all
        # states, zero sockid, no dbs), the request sockscope.netlink.build_legacy_request sends
        self.sock.send(struct.pack("=IHHII" "BBBB" "48x" "II", 76, 18, 0x301, self.seq, 0,
                                   socket.AF_UNSPEC, 0, 0, 0, 0xFFF, 0))
        buf, recv, total = self.buf, self.sock.recv_into, 0
        while True:
            n = recv(buf)
            total += n
            if _TAIL.unpack_from(buf, n - 20) == (20, NLMSG_DONE) or _HEAD.unpack_from(buf)[1] < 16:
                return {"bytes": total}


class Sockscope:
    def __init__(self) -> None:
        from sockscope.aggregate import Rules
        from sockscope.netlink import Reader
        from sockscope.poller import poll_once

        self.reader = Reader()
        self.rules = Rules()
        self.poll_once = poll_once

    def run(self) -> dict:
        snap, _ = self.poll_once(self.reader, self.rules)
        states: dict[str, int] = {}
        for (_fam, state), n in snap.states.items():
            states[state] = states.get(state, 0) + n
        return {"sockets": snap.sockets, "states": states, "messages": snap.messages}


def _vm_hwm() -> int:
    # Not ru_maxrss: Linux carries it over from the parent across fork + exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    tool = {"floor": Floor, "sockscope": Sockscope}[sys.argv[1]]()
    for line in sys.stdin:
        if line.strip() != "run":
            break
        c0, w0 = time.process_time(), time.perf_counter()
        out = tool.run()
        out["cpu"] = time.process_time() - c0
        out["wall"] = time.perf_counter() - w0
        out["maxrss"] = _vm_hwm()
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
