"""webconfig: the exporter-toolkit web config format, validated whole; basic auth with a
cache of successful bcrypt checks. Certificates come from the openssl CLI (tmp dir)."""

from __future__ import annotations

import base64
import statistics
import time

import bcrypt
import pytest

from sockscope import webconfig
from sockscope.config import ConfigError
from support.prereq import require
from support.service import have_openssl, make_certs

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    require(have_openssl(), "needs the openssl CLI (Debian openssl)")
    return make_certs(tmp_path_factory.mktemp("certs"))


def problems(data, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        webconfig.from_mapping(data, "web.yml", **kw)
    return e.value.problems


def test_empty_file_is_plain_http_without_auth():
    web = webconfig.from_mapping(None)
    assert web.tls is None and web.users == {} and web.scheme == "http"
    assert web.authorized(None)


def test_every_problem_is_reported_at_once():
    got = problems({
        "tls_server_config": {"cert_file": "", "cipher_suites": ["x"], "client_auth": "x",
                              "min_version": "TLS14", "client_auth_type": "RequireAnyClientCert"},
        "basic_auth_users": {"bob": "plain", "a:b": HASH},
        "http_server_config": {"http2": True},
        "basic_auth_user": {},
    })
    assert got == [
        "http_server_config: not supported by sockscope (an exporter-toolkit key)",
        "basic_auth_user: unknown key (did you mean 'basic_auth_users'?)",
        "tls_server_config.cipher_suites: not supported by sockscope (an exporter-toolkit key)",
        "tls_server_config.client_auth: unknown key (did you mean 'client_auth_type'?)",
        "tls_server_config.cert_file: expected a non-empty string",
        "tls_server_config.key_file: required when tls_server_config is given",
        "tls_server_config.client_auth_type: RequireAnyClientCert is not supported (Python's ssl "
        "cannot request a client certificate without verifying it); use VerifyClientCertIfGiven "
        "or RequireAndVerifyClientCert",
        "tls_server_config.min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13",
        "basic_auth_users.bob: not a bcrypt hash ($2a$, $2b$ or $2y$, a cost 04-31, '$', then 53 "
        "characters of ./A-Za-z0-9)",
        "basic_auth_users.a:b: a user name must be a non-empty string of printable characters without ':'",
    ]


def test_tls_consistency_rules(certs):
    base = {"cert_file": str(certs.cert), "key_file": str(certs.key)}
    assert problems({"tls_server_config": base | {"client_auth_type": "RequireAndVerifyClientCert"}}) == [
        "tls_server_config.client_auth_type: RequireAndVerifyClientCert needs client_ca_file"]
    assert problems({"tls_server_config": base | {"client_ca_file": str(certs.ca)}}) == [
        "tls_server_config.client_ca_file: given, but client_auth_type is NoClientCert "
        "(set RequireAndVerifyClientCert or VerifyClientCertIfGiven)"]
    assert problems({"tls_server_config": base | {"min_version": "TLS13", "max_version": "TLS12"}}) == [
        "tls_server_config.min_version: TLS13 is above max_version"]
    (msg,) = problems({"tls_server_config": base | {"key_file": str(certs.client_key)}})
    assert msg.startswith("tls_server_config.cert_file/key_file: cannot load")
    (msg,) = problems({"tls_server_config": base | {"cert_file": "/nonexistent.crt"}})
    assert "No such file" in msg


def test_file_paths_are_relative_to_the_web_config(certs, tmp_path):
    path = certs.cert.parent / "web.yml"
    path.write_text(f"tls_server_config:\n  cert_file: {certs.cert.name}\n  key_file: {certs.key.name}\n"
                    f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {certs.ca.name}\n"
                    f"basic_auth_users:\n  prometheus: '{HASH}'\n")
    web = webconfig.load(str(path))
    assert web.scheme == "https" and set(web.users) == {"prometheus"}
    import ssl
    assert web.tls.minimum_version == ssl.TLSVersion.TLSv1_2
    assert web.tls.verify_mode == ssl.CERT_OPTIONAL


def test_yaml_errors_are_config_errors(tmp_path):
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  a: x\n  a: y\n")
    with pytest.raises(ConfigError, match="appears twice"):
        webconfig.load(str(path))


@pytest.mark.parametrize(("hashed", "fragment"), [
    ("$2b$99$" + HASH[7:], "bcrypt cost 99 is outside 04-31"),  # passed before, then failed every login
    ("$2b$03$" + HASH[7:], "bcrypt cost 03 is outside 04-31"),
    ("$2b$4$" + HASH[7:], "not a bcrypt hash"),
    (HASH[:-1] + "!", "not a bcrypt hash"),  # outside bcrypt's base64 alphabet
    (HASH[:-1] + "\u0665", "not a bcrypt hash"),
    ("$2b$\u0661\u0662" + HASH[6:], "not a bcrypt hash"),  # non-ASCII digits in the cost
    (HASH + "x", "not a bcrypt hash"),
    ("$2x$" + HASH[4:], "not a bcrypt hash"),
    (12, "expected a bcrypt hash"),
    (None, "expected a bcrypt hash"),
], ids=["cost-99", "cost-03", "short-cost", "alphabet", "non-ascii", "non-ascii-cost", "long", "2x", "int", "null"])
def test_bcrypt_hashes_are_checked_when_loading(hashed, fragment):
    (problem,) = problems({"basic_auth_users": {"prometheus": hashed}})
    assert problem.startswith("basic_auth_users.prometheus: "), problem
    assert fragment in problem


def test_cost_limits_inclusive():
    for cost in ("04", "31"):
        web = webconfig.from_mapping({"basic_auth_users": {"u": HASH[:4] + cost + HASH[6:]}})
        assert set(web.users) == {"u"}


def test_user_names_are_shown_safely():
    got = problems({"basic_auth_users": {"a\nb": HASH, "u" * 5000: 5}})
    assert got[0] == "basic_auth_users.'a\\nb': a user name must be a non-empty string of printable " \
        "characters without ':'"
    assert got[1].startswith("basic_auth_users.'uuuu") and len(got[1]) < 200


def write_web(tmp_path, text: str):
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("text", "fragment"), [
    ("basic_auth_users:\n  u: !!binary 'zz!'\n", "basic_auth_users.u: line 2, column 6: invalid YAML"),
    ("tls_server_config: !!bool maybe\n", "tls_server_config: line 1, column 20: invalid YAML: cannot read 'maybe'"),
    ("basic_auth_users: " + "[" * 1000 + "]" * 1000 + "\n", "YAML syntax error"),
    ("x: &a [a, a, a, a, a, a, a, a, a, a]\n" + "".join(
        f"x{i}: &{'b' * i} [{', '.join(['*' + ('b' * (i - 1) or 'a')] * 10)}]\n" for i in range(1, 6))
     + "basic_auth_users: *bbbbb\n", "YAML refused: the document expands to more than 20,000 nodes"),
], ids=["binary", "bool-maybe", "deep", "alias-bomb"])
def test_hostile_web_config_files_are_config_errors(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        webconfig.load(write_web(tmp_path, text))
    assert any(fragment in p for p in e.value.problems), e.value.problems


def test_files_are_regular_and_bounded(tmp_path, certs):
    import os
    import time

    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.crt"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    started = time.monotonic()
    for key, path, fragment in (("key_file", fifo, "a FIFO, not a regular file"),
                                ("cert_file", "/dev/zero", "a character device, not a regular file"),
                                ("cert_file", big, "larger than the limit")):
        tls = {"cert_file": str(certs.cert), "key_file": str(certs.key), key: str(path)}
        (problem,) = problems({"tls_server_config": tls})
        assert problem.startswith(f"tls_server_config.{key}: '{path}': "), problem
        assert fragment in problem
    assert time.monotonic() - started < 1  # nothing waited for a writer or read /dev/zero
    with pytest.raises(ConfigError, match="a FIFO, not a regular file"):
        webconfig.load(str(fifo))


def test_an_encrypted_key_is_refused_without_prompting(tmp_path, certs):
    import subprocess

    encrypted = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(certs.key), "-out", str(encrypted), "-aes256",
                    "-passout", "pass:secret"], check=True, capture_output=True, timeout=30)
    (problem,) = problems({"tls_server_config": {"cert_file": str(certs.cert), "key_file": str(encrypted)}})
    assert problem.startswith("tls_server_config.key_file: ") and "is encrypted" in problem, problem


def test_basic_auth_answers():
    web = webconfig.from_mapping({"basic_auth_users": {"prometheus": HASH}})
    assert web.authorized(basic("prometheus", "s3cret"))
    assert not web.authorized(None)
    assert not web.authorized(basic("prometheus", "wrong"))
    assert not web.authorized(basic("nobody", "s3cret"))
    assert not web.authorized("Bearer abc")
    assert not web.authorized("Basic !!!notbase64")
    assert not web.authorized("Basic " + base64.b64encode(b"no-colon").decode())


def test_2y_hashes_from_htpasswd_work():
    hashed = "$2y$" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()[4:]
    web = webconfig.from_mapping({"basic_auth_users": {"u": hashed}})
    assert web.authorized(basic("u", "pw")) and not web.authorized(basic("u", "px"))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_successes_are_cached_failures_briefly():
    calls = []

    def counting(password, hashed):
        calls.append(password)
        return bcrypt.checkpw(password, hashed)

    clock = Clock()
    web = webconfig.from_mapping({"basic_auth_users": {"prometheus": HASH}})
    web = webconfig.WebConfig(web.source, None, web.users, checkpw=counting, monotonic=clock)
    assert web.auth_quick(basic("prometheus", "s3cret")) is None  # needs bcrypt
    for _ in range(5):
        assert web.authorized(basic("prometheus", "s3cret"))
    assert calls == [b"s3cret"]
    assert web.auth_quick(basic("prometheus", "s3cret")) is True
    # One wrong password repeated costs one bcrypt check per FAIL_CACHE_SECONDS.
    for _ in range(3):
        assert not web.authorized(basic("prometheus", "wrong"))
    assert calls == [b"s3cret", b"wrong"]
    assert web.auth_quick(basic("prometheus", "wrong")) is False
    clock.now += webconfig.FAIL_CACHE_SECONDS + 0.1
    assert web.auth_quick(basic("prometheus", "wrong")) is None
    assert not web.authorized(basic("prometheus", "wrong"))
    assert calls == [b"s3cret", b"wrong", b"wrong"]
    # Unknown users still pay one bcrypt check (no timing oracle for user names).
    assert not web.authorized(basic("eve", "s3cret"))
    assert len(calls) == 4


def test_passwords_bcrypt_cannot_take_are_refused_not_raised():
    web = webconfig.from_mapping({"basic_auth_users": {"prometheus": HASH}})
    for password in ("x" * 73, "x" * 4000, "s3cret\0tail", "\udcff"):
        header = "Basic " + base64.b64encode(b"prometheus:" + password.encode("utf-8", "surrogateescape")).decode()
        assert web.authorized(header) is False
    assert web.authorized(basic("prometheus", "s3cret"))


def test_unknown_user_takes_as_long_as_a_wrong_password():
    # Regression (issue 9 defect 4): the dummy hash had cost 10 whatever the users' cost,
    # so with cost-12 hashes a wrong user answered 4x faster than a wrong password.
    # Measured in CPU time of this thread (bcrypt runs in the caller's thread), which is
    # what the wall time of an otherwise idle server shows an attacker, and is not
    # disturbed by other load on the test machine; rounds interleaved.
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=11)).decode()
    web = webconfig.from_mapping({"basic_auth_users": {"prometheus": hashed, "cheap": HASH}})
    times: dict[str, list[float]] = {"nobody": [], "prometheus": []}
    for i in range(7):
        for user in times:
            header = basic(user, f"wrong-{user}-{i}")  # a new password each time: never cached
            started = time.thread_time()
            assert not web.authorized(header)
            times[user].append(time.thread_time() - started)
    ratio = statistics.median(times["nobody"]) / statistics.median(times["prometheus"])
    assert 0.9 <= ratio <= 1.1, times
