"""The web config file (`--web.config.file`): TLS and basic auth for /metrics.

The format is the one Go exporters read through prometheus/exporter-toolkit, so one file
serves node_exporter and sockscope alike:

    tls_server_config:
      cert_file: server.crt          # relative paths: from the web config's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: clients-ca.crt                 # optional
      min_version: TLS12                             # optional (default TLS12)
      max_version: TLS13                             # optional (default TLS13)
    basic_auth_users:
      prometheus: $2b$12$...         # bcrypt hash (htpasswd -nBC 12 "" | tr -d ':\n')

The only module that imports ssl and bcrypt. `load(path)` validates the whole file and
reports every problem at once (ConfigError, like the main config); unknown keys are
errors, and the exporter-toolkit keys sockscope does not implement are named as such.

Serving: `WebConfig.accept(sock)` runs in the connection's worker thread, never in the
accept loop, so a client that connects and says nothing ties up only its own thread
until `handshake_timeout`. `WebConfig.authorized(header)` checks an Authorization header.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import hmac
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from .config import ConfigError, read_yaml

log = logging.getLogger(__name__)

__all__ = ["WebConfig", "TLSHandshakeError", "load", "from_mapping", "HANDSHAKE_TIMEOUT"]

HANDSHAKE_TIMEOUT = 10.0  # seconds a connection may take to complete the TLS handshake

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit client_auth_type -> ssl verify mode. Python's ssl cannot ask for a
# client certificate without verifying it, so the two "any certificate" modes are refused.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_CLIENT_AUTH_UNSUPPORTED = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

_TOP_KEYS = ("tls_server_config", "basic_auth_users")
_TOP_UNSUPPORTED = ("http_server_config",)
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
_TLS_UNSUPPORTED = (
    "cert", "key", "client_ca", "cipher_suites", "curve_preferences",
    "prefer_server_cipher_suites", "client_allowed_sans",
)

# A TLS record starts with content type 22 (handshake); anything else on the TLS port is
# most likely plain HTTP, answered like Go's net/http does.
_TLS_HANDSHAKE_RECORD = 0x16
_PLAIN_HTTP_REPLY = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
_CACHE_MAX = 256  # successful (user, password) pairs remembered


class TLSHandshakeError(ConnectionError):
    """A connection that did not complete the TLS handshake (timeout, plain HTTP, bad cert).

    A ConnectionError, so the HTTP server files it with clients hanging up (debug log)."""


@dataclass(frozen=True, eq=False)
class WebConfig:
    """A validated web config. `tls` None = plain HTTP; `users` empty = no authentication."""

    source: str
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    checkpw: Callable[[bytes, bytes], bool] = bcrypt.checkpw
    # sha256(user NUL password NUL hash) of pairs that passed bcrypt once: bcrypt at cost
    # 10-12 takes 50-250 ms of CPU, which every scrape would otherwise pay.
    _cache: set = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    # -- connection ---------------------------------------------------------------------

    def accept(self, sock: socket.socket) -> socket.socket:
        """The socket to speak HTTP on: `sock` itself, or its TLS wrapper after the handshake.

        Runs in the worker thread. Raises TLSHandshakeError (after answering plain HTTP
        with a 400) when the handshake fails or takes longer than handshake_timeout.
        """
        if self.tls is None:
            return sock
        sock.settimeout(self.handshake_timeout)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                raise TLSHandshakeError("closed before the TLS handshake")
            if first[0] != _TLS_HANDSHAKE_RECORD:
                try:
                    sock.sendall(_PLAIN_HTTP_REPLY)
                except OSError:
                    pass
                raise TLSHandshakeError("plain HTTP sent to the HTTPS port")
            tls_sock = self.tls.wrap_socket(sock, server_side=True)  # handshakes here
        except TimeoutError as e:
            raise TLSHandshakeError(f"no TLS handshake within {self.handshake_timeout:g} s") from e
        except (ssl.SSLError, OSError) as e:
            raise TLSHandshakeError(f"TLS handshake failed: {e}") from e
        tls_sock.settimeout(None)
        return tls_sock

    # -- basic auth ---------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        """True if no users are configured or `header` carries a valid user and password."""
        if not self.users:
            return True
        user, password = _parse_basic(header)
        if user is None:
            return False
        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed or b""))).digest()
        with self._lock:
            if hashed is not None and key in self._cache:
                return True
        # An unknown user still costs one bcrypt check, so timing does not tell which
        # user names exist.
        ok = self.checkpw(password, hashed or _DUMMY_HASH) and hashed is not None
        if ok:
            with self._lock:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache.add(key)
        return ok


# bcrypt("sockscope", cost 10): checked against for unknown users.
_DUMMY_HASH = b"$2b$10$t9V08ygodNQIq.QZoioVH.lroJAGEZ4OiZbBD1Ayd65wN9OzyVgjq"


def _parse_basic(header: str | None) -> tuple[str | None, bytes]:
    if not header:
        return None, b""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, b""
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None, b""
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None, b""
    return user.decode("utf-8", errors="replace"), password


# -- loading ----------------------------------------------------------------------------


def load(path: str) -> WebConfig:
    """The web config at path, fully validated (certificates loaded). Raises ConfigError."""
    return from_mapping(read_yaml(path), path, base_dir=os.path.dirname(os.path.abspath(path)))


def _unknown(mapping: dict, known: tuple[str, ...], unsupported: tuple[str, ...], prefix: str,
             problems: list[str]) -> None:
    for key in mapping:
        if key in known:
            continue
        if key in unsupported:
            problems.append(f"{prefix}{key}: not supported by sockscope (an exporter-toolkit key)")
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{prefix}{key}: unknown key{hint}")


def _string(raw: dict, key: str, prefix: str, problems: list[str]) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append(f"{prefix}{key}: expected a non-empty string")
        return None
    return value


def from_mapping(data: Any, source: str = "<web config>", *, base_dir: str = ".",
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> WebConfig:
    """A WebConfig from a parsed YAML document (None = empty: plain HTTP, no auth)."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level: expected a mapping ({', '.join(_TOP_KEYS)})", source)
    _unknown(data, _TOP_KEYS, _TOP_UNSUPPORTED, "", problems)
    tls = None
    if data.get("tls_server_config") is not None:
        tls = _tls_context(data["tls_server_config"], base_dir, problems)
    users = _users(data.get("basic_auth_users"), problems)
    if problems:
        raise ConfigError(problems, source)
    return WebConfig(source, tls, users, handshake_timeout)


def _tls_context(raw: Any, base_dir: str, problems: list[str]) -> ssl.SSLContext | None:
    p = "tls_server_config."
    if not isinstance(raw, dict):
        problems.append(f"{p[:-1]}: expected a mapping")
        return None
    before = len(problems)
    _unknown(raw, _TLS_KEYS, _TLS_UNSUPPORTED, p, problems)
    files = {k: _string(raw, k, p, problems) for k in ("cert_file", "key_file", "client_ca_file")}
    for key in ("cert_file", "key_file"):
        if files[key] is None and key not in raw:
            problems.append(f"{p}{key}: required when tls_server_config is given")
    files = {k: v if v is None else os.path.join(base_dir, v) for k, v in files.items()}

    auth_name = _string(raw, "client_auth_type", p, problems) or "NoClientCert"
    verify = _CLIENT_AUTH.get(auth_name)
    if verify is None:
        if auth_name in _CLIENT_AUTH_UNSUPPORTED:
            problems.append(f"{p}client_auth_type: {auth_name} is not supported (Python's ssl cannot "
                            "request a client certificate without verifying it); use "
                            "VerifyClientCertIfGiven or RequireAndVerifyClientCert")
        else:
            problems.append(f"{p}client_auth_type: {auth_name!r} is not one of {', '.join(_CLIENT_AUTH)}")
    elif verify != ssl.CERT_NONE and files["client_ca_file"] is None:
        problems.append(f"{p}client_auth_type: {auth_name} needs client_ca_file")
    elif verify == ssl.CERT_NONE and files["client_ca_file"] is not None:
        problems.append(f"{p}client_ca_file: given, but client_auth_type is NoClientCert "
                        "(set RequireAndVerifyClientCert or VerifyClientCertIfGiven)")

    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _string(raw, key, p, problems) or default
        if name not in _TLS_VERSIONS:
            problems.append(f"{p}{key}: {name!r} is not one of {', '.join(_TLS_VERSIONS)}")
        versions[key] = _TLS_VERSIONS.get(name)
    if None not in versions.values() and versions["min_version"] > versions["max_version"]:
        problems.append(f"{p}min_version: {raw.get('min_version', 'TLS12')} is above max_version")
    if len(problems) > before:
        return None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = versions["min_version"]
    ctx.maximum_version = versions["max_version"]
    try:
        ctx.load_cert_chain(files["cert_file"], files["key_file"])
    except (OSError, ssl.SSLError) as e:
        problems.append(f"{p}cert_file/key_file: cannot load {files['cert_file']} with "
                        f"{files['key_file']}: {getattr(e, 'strerror', None) or e}")
        return None
    if files["client_ca_file"] is not None:
        try:
            ctx.load_verify_locations(cafile=files["client_ca_file"])
        except (OSError, ssl.SSLError) as e:
            problems.append(f"{p}client_ca_file: cannot load {files['client_ca_file']}: "
                            f"{getattr(e, 'strerror', None) or e}")
            return None
    ctx.verify_mode = verify
    return ctx


def _users(raw: Any, problems: list[str]) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("basic_auth_users: expected a mapping of user name to bcrypt hash")
        return {}
    users = {}
    for user, hashed in raw.items():
        path = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            problems.append(f"{path}: a user name must be a non-empty string without ':'")
            continue
        if not isinstance(hashed, str) or not _is_bcrypt(hashed):
            problems.append(f"{path}: not a bcrypt hash ($2a$, $2b$ or $2y$, 60 characters)")
            continue
        users[user] = hashed.encode()
    return users


def _is_bcrypt(value: str) -> bool:
    return (len(value) == 60 and value[:4] in ("$2a$", "$2b$", "$2y$") and value[4:6].isdigit()
            and value[6] == "$")
