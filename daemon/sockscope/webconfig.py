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

Serving: the HTTP server (httpserver.py) handshakes with `WebConfig.tls` itself, without
blocking, and checks an Authorization header with `auth_quick` (cache only) and
`authorized` (bcrypt, in one thread of its own).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from .config import ConfigError, file_problem, key_text, read_yaml, show_value

log = logging.getLogger(__name__)

__all__ = ["WebConfig", "load", "from_mapping", "FAIL_CACHE_SECONDS"]

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

_PATH_SHOWN = 300  # characters of a file name in a problem
_CACHE_MAX = 256  # successful (user, password) pairs remembered
_FAIL_CACHE_MAX = 4096  # failed pairs remembered (each for FAIL_CACHE_SECONDS)
FAIL_CACHE_SECONDS = 10.0


@dataclass(frozen=True, eq=False)
class WebConfig:
    """A validated web config. `tls` None = plain HTTP; `users` empty = no authentication.

    The HTTP server (httpserver.py) does the TLS handshake itself with `tls`, and checks
    credentials in two steps: `auth_quick` in its I/O thread (cache lookups only) and, when
    that cannot decide, `authorized` in its single bcrypt thread.
    """

    source: str
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    checkpw: Callable[[bytes, bytes], bool] = bcrypt.checkpw
    monotonic: Callable[[], float] = time.monotonic
    # sha256(user NUL password NUL hash) of pairs that passed bcrypt once: bcrypt at cost
    # 10-12 takes 50-250 ms of CPU, which every scrape would otherwise pay.
    _ok: set = field(default_factory=set, repr=False)
    # The same for pairs that failed, with their expiry: a client retrying one wrong
    # password (a mistyped scrape config, a script in a loop) costs one bcrypt per
    # FAIL_CACHE_SECONDS, not one per request.
    _failed: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Checked for unknown user names, at the highest cost among the configured hashes, so
    # a wrong user name takes as long as a wrong password (no user enumeration by timing).
    _dummy: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.users and not self._dummy:
            object.__setattr__(self, "_dummy", _dummy_hash(max(_cost(h) for h in self.users.values())))

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    # -- basic auth ---------------------------------------------------------------------

    def _key(self, header: str | None) -> tuple[bytes, bytes | None, bytes] | None:
        """(cache key, stored hash or None, password); None for a malformed header."""
        user, password = _parse_basic(header)
        if user is None:
            return None
        hashed = self.users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode("utf-8", "surrogateescape"), password,
                                          hashed or b""))).digest()
        return key, hashed, password

    def auth_quick(self, header: str | None) -> bool | None:
        """True/False when no bcrypt check is needed to decide; None when one is."""
        if not self.users:
            return True
        parsed = self._key(header)
        if parsed is None:
            return False
        key, hashed, _ = parsed
        with self._lock:
            if hashed is not None and key in self._ok:
                return True
            expiry = self._failed.get(key)
            if expiry is not None:
                if expiry > self.monotonic():
                    return False
                del self._failed[key]
        return None

    def authorized(self, header: str | None) -> bool:
        """True if no users are configured or `header` carries a valid user and password.

        Never raises: a password bcrypt cannot take (over 72 bytes: bcrypt >= 4.1 raises
        ValueError) or a hash it cannot use is simply not a match."""
        quick = self.auth_quick(header)
        if quick is not None:
            return quick
        key, hashed, password = self._key(header)  # type: ignore[misc]  # auth_quick parsed it
        try:
            ok = self.checkpw(password, hashed or self._dummy) and hashed is not None
        except (ValueError, TypeError):
            ok = False
        with self._lock:
            if ok:
                if len(self._ok) >= _CACHE_MAX:
                    self._ok.clear()
                self._ok.add(key)
            else:
                if len(self._failed) >= _FAIL_CACHE_MAX:
                    self._failed.clear()
                self._failed[key] = self.monotonic() + FAIL_CACHE_SECONDS
        return ok


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


def _dummy_hash(cost: int) -> bytes:
    """A well-formed bcrypt hash of a random password at `cost`, matched by nothing: a
    cost-4 hash (made in ~1 ms) with its cost field rewritten, so checking against it
    takes as long as checking against a real hash of that cost."""
    real = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(rounds=4))
    return real[:4] + b"%02d" % cost + real[6:]


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
    """The web config at path, fully validated (certificates loaded). Raises ConfigError only:
    the file rules of the main config apply (regular file, size, YAML limits), and so do
    they to the certificate and key files."""
    data = read_yaml(path)
    try:
        return from_mapping(data, path, base_dir=os.path.dirname(os.path.abspath(path)))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a reload must survive whatever ssl or bcrypt raise
        raise ConfigError(f"cannot load: {type(e).__name__}: {show_value(str(e))}", path) from None


def _unknown(mapping: dict, known: tuple[str, ...], unsupported: tuple[str, ...], prefix: str,
             problems: list[str]) -> None:
    hints = 0
    for key in mapping:
        if key in known:
            continue
        if key in unsupported:
            problems.append(f"{prefix}{key}: not supported by sockscope (an exporter-toolkit key)")
            continue
        hint = ""
        if isinstance(key, str) and len(key) <= 60 and hints < 20:  # difflib is slow on thousands
            hints += 1
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{prefix}{key_text(key)}: unknown key{hint}")


def _string(raw: dict, key: str, prefix: str, problems: list[str]) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.append(f"{prefix}{key}: expected a non-empty string")
        return None
    return value


def from_mapping(data: Any, source: str = "<web config>", *, base_dir: str = ".") -> WebConfig:
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
    return WebConfig(source, tls, users)


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
            problems.append(f"{p}client_auth_type: {show_value(auth_name)} is not one of {', '.join(_CLIENT_AUTH)}")
    elif verify != ssl.CERT_NONE and files["client_ca_file"] is None:
        problems.append(f"{p}client_auth_type: {auth_name} needs client_ca_file")
    elif verify == ssl.CERT_NONE and files["client_ca_file"] is not None:
        problems.append(f"{p}client_ca_file: given, but client_auth_type is NoClientCert "
                        "(set RequireAndVerifyClientCert or VerifyClientCertIfGiven)")

    versions: dict[str, Any] = {}  # TLSVersion, None for a problem (reported)
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _string(raw, key, p, problems) or default
        if name not in _TLS_VERSIONS:
            problems.append(f"{p}{key}: {show_value(name)} is not one of {', '.join(_TLS_VERSIONS)}")
        versions[key] = _TLS_VERSIONS.get(name)
    if None not in versions.values() and versions["min_version"] > versions["max_version"]:
        problems.append(f"{p}min_version: {raw.get('min_version', 'TLS12')} is above max_version")
    # OpenSSL would block on a FIFO and read /dev/zero until memory runs out: only regular
    # files of at most 1 MiB are handed to it.
    for key, path in files.items():
        problem = None if path is None else file_problem(path)
        if problem:
            problems.append(f"{p}{key}: {show_value(path, _PATH_SHOWN)}: {problem}")
    if len(problems) > before:
        return None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = versions["min_version"]
    ctx.maximum_version = versions["max_version"]
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        # Without a callback OpenSSL prompts on the terminal for an encrypted key's
        # passphrase, which would hang a reload.
        asked.append(True)
        return b""

    try:
        ctx.load_cert_chain(files["cert_file"], files["key_file"], password=no_passphrase)  # type: ignore[arg-type]  # None is a problem: returned above
    except (OSError, ssl.SSLError, ValueError) as e:
        if asked:
            problems.append(f"{p}key_file: {show_value(files['key_file'], _PATH_SHOWN)} is encrypted; "
                            "sockscope cannot ask for a passphrase (write it decrypted: "
                            "openssl pkey -in KEY -out PLAIN)")
        else:
            problems.append(f"{p}cert_file/key_file: cannot load "
                            f"{show_value(files['cert_file'], _PATH_SHOWN)} with "
                            f"{show_value(files['key_file'], _PATH_SHOWN)}: {getattr(e, 'strerror', None) or e}")
        return None
    if files["client_ca_file"] is not None:
        try:
            ctx.load_verify_locations(cafile=files["client_ca_file"])
        except (OSError, ssl.SSLError, ValueError) as e:
            problems.append(f"{p}client_ca_file: cannot load {show_value(files['client_ca_file'], _PATH_SHOWN)}: "
                            f"{getattr(e, 'strerror', None) or e}")
            return None
    ctx.verify_mode = verify  # type: ignore[assignment]  # None is a problem: returned above
    return ctx


def _users(raw: Any, problems: list[str]) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("basic_auth_users: expected a mapping of user name to bcrypt hash")
        return {}
    users = {}
    for user, hashed in raw.items():
        path = f"basic_auth_users.{key_text(user)}"
        if not isinstance(user, str) or not user or ":" in user or not user.isprintable():
            problems.append(f"{path}: a user name must be a non-empty string of printable characters "
                            "without ':'")
            continue
        problem = _bcrypt_problem(hashed)
        if problem:
            problems.append(f"{path}: {problem}")
            continue
        users[user] = hashed.encode()
    return users


# $2a$/$2b$/$2y$, a two-digit cost, '$', 22 characters of salt and 31 of hash in bcrypt's
# base64 alphabet (./A-Za-z0-9): the modular crypt format htpasswd -B writes.
_BCRYPT = re.compile(r"\$2[aby]\$([0-9]{2})\$[./A-Za-z0-9]{53}")
_BCRYPT_FORM = "$2a$, $2b$ or $2y$, a cost 04-31, '$', then 53 characters of ./A-Za-z0-9"


def _bcrypt_problem(value: Any) -> str | None:
    """Why value is not a bcrypt hash that bcrypt.checkpw accepts, or None."""
    if not isinstance(value, str):
        return f"expected a bcrypt hash ({_BCRYPT_FORM}), got {show_value(value)}"
    match = _BCRYPT.fullmatch(value)
    if match is None:
        return f"not a bcrypt hash ({_BCRYPT_FORM})"
    if not 4 <= int(match[1]) <= 31:
        # bcrypt refuses such a hash at every check: every login would fail.
        return f"bcrypt cost {match[1]} is outside 04-31"
    return None
