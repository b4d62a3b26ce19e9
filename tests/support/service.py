"""What the service tests need besides a daemon: a NOTIFY_SOCKET listener, test
certificates (openssl CLI, into a temp dir) and a client TLS context.

    with NotifyListener(tmp_path) as n:         # a bound AF_UNIX datagram socket
        env["NOTIFY_SOCKET"] = n.address        # a path, or "@name" when abstract=True
        n.wait_for("READY=1", timeout=10)       # -> (monotonic time, {key: value})
        n.messages                              # every (time, fields) received so far

    certs = make_certs(tmp_path)                # .ca, .cert, .key, .client_cert, .client_key
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEDGE_DRIVER = str(HERE / "wedge_daemon.py")


class NotifyListener:
    """Receives sd_notify datagrams in a thread, with the monotonic time of arrival."""

    def __init__(self, directory: Path, *, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"sockscope-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = str(directory / "notify.sock")
            self.sock.bind(path)
            self.address = path
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait_for(self, assignment: str, timeout: float, after: float = 0.0) -> tuple[float, dict]:
        """The first message received after `after` carrying KEY=VALUE `assignment`."""
        key, value = assignment.split("=", 1)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, fields in self.messages:
                    if t > after and fields.get(key) == value:
                        return t, fields
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {assignment} within {timeout}s; got {self.messages}")
                self._cond.wait(left)

    def times(self, key: str, value: str, after: float = 0.0, before: float = float("inf")) -> list[float]:
        with self._cond:
            return [t for t, f in self.messages if after < t < before and f.get(key) == value]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {r.stderr}")


def make_certs(directory: Path) -> Certs:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client
    certificate, all EC P-256, valid one day."""
    d = directory
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=sockscope test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
             cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=sockscope test {name}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


def client_context(certs: Certs, *, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return ctx


def have_openssl() -> bool:
    return shutil.which("openssl") is not None
