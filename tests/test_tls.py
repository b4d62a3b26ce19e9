"""/metrics behind TLS and basic auth from a web config file: the real daemon scraped with
the stdlib client, curl-free; idle connections; client certificates; and a real
Prometheus (Debian `prometheus`) scraping it with scheme https, tls_config, basic_auth."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from sockscope import webconfig
from sockscope.httpserver import HTTPServer, Limits
from sockscope.prometheus import make_registry, metrics_server
from support.daemon import samples, scrape, start_daemon
from support.prereq import require
from support.prom_server import RealPrometheus
from support.service import client_context, have_openssl, make_certs

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    require(have_openssl(), "needs the openssl CLI (Debian openssl)")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def daemon(certs, tmp_path_factory):
    work = tmp_path_factory.mktemp("tls-daemon")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    web = work / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {certs.cert}\n  key_file: {certs.key}\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    d = start_daemon(work, "poll:\n  interval: 500ms\n", extra_args=("--web.config.file", str(web)),
                     scheme="https", context=client_context(certs), auth=("prometheus", PASSWORD))
    yield d
    assert d.stop() == 0, d.log()


def status_of(url, *, context=None, auth=None) -> int:
    try:
        scrape(url, context=context, auth=auth)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def test_basic_auth_codes(daemon, certs):
    ctx = client_context(certs)
    assert status_of(daemon.url, context=ctx) == 401
    assert status_of(daemon.url, context=ctx, auth=("prometheus", "wrong")) == 401
    assert status_of(daemon.url, context=ctx, auth=("someone", PASSWORD)) == 401
    assert status_of(daemon.url.replace("/metrics", "/"), context=ctx) == 401
    s = samples(daemon.scrape())
    assert s[("sockscope_up", ())] == 1.0
    req = urllib.request.Request(daemon.url)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5, context=ctx)
    assert e.value.headers["WWW-Authenticate"] == 'Basic realm="sockscope"'


def test_plain_http_to_the_tls_port_is_refused(daemon):
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 400 Bad Request")
    assert b"sockscope_" not in reply
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(daemon.url.replace("https:", "http:"), auth=("prometheus", PASSWORD))


def test_untrusted_server_certificate_is_rejected_by_the_client(daemon):
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        scrape(daemon.url, context=ssl.create_default_context(), auth=("prometheus", PASSWORD))


def test_idle_connections_do_not_stall_a_scrape(daemon):
    idle = []
    try:
        for i in range(5):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            if i % 2:
                s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            idle.append(s)
        time.sleep(0.2)
        started = time.monotonic()
        text = daemon.scrape(timeout=5)
        took = time.monotonic() - started
    finally:
        for s in idle:
            s.close()
    assert "sockscope_up 1.0" in text
    assert took < 1.0, f"scrape took {took:.2f}s with idle connections open"


def _server(web, limits: Limits = Limits()) -> HTTPServer:
    registry = make_registry(_Const())
    server = metrics_server(registry, "127.0.0.1", 0, web=web, limits=limits)
    server.start()
    return server


class _Const:
    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        yield GaugeMetricFamily("sockscope_test_const", "A constant.", value=1)


def test_silent_client_is_dropped_after_the_handshake_timeout(certs):
    web = webconfig.from_mapping({"tls_server_config": {"cert_file": str(certs.cert),
                                                        "key_file": str(certs.key)}})
    server = _server(web, Limits(request_timeout=0.5))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            started = time.monotonic()
            assert s.recv(10) == b""  # closed by the server
            took = time.monotonic() - started
        assert 0.4 < took < 2.0
    finally:
        server.stop()


def test_client_certificate_required(certs):
    web = webconfig.from_mapping({"tls_server_config": {
        "cert_file": str(certs.cert), "key_file": str(certs.key),
        "client_ca_file": str(certs.ca), "client_auth_type": "RequireAndVerifyClientCert"}})
    server = _server(web)
    url = f"https://127.0.0.1:{server.port}/metrics"
    try:
        assert "sockscope_test_const 1.0" in scrape(url, context=client_context(certs, client_cert=True))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            scrape(url, context=client_context(certs))
    finally:
        server.stop()


def test_web_config_errors_stop_the_daemon_at_start(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: /nonexistent\nbasic_auth_users: {}\nbogus: 1\n")
    r = subprocess.run([*_sockscope(), "run", "--web.config.file", str(web)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "tls_server_config.key_file: required" in r.stderr
    assert "bogus: unknown key" in r.stderr


def _sockscope():
    import sys
    return [sys.executable, "-m", "sockscope"]


# -- a real Prometheus -------------------------------------------------------------------


def test_prometheus_scrapes_https_with_basic_auth(daemon, certs, tmp_path):
    job = {
        "job_name": "sockscope",
        "scheme": "https",
        "tls_config": {"ca_file": str(certs.ca), "server_name": "localhost"},
        "basic_auth": {"username": "prometheus", "password": PASSWORD},
        "static_configs": [{"targets": [daemon.address]}],
    }
    with RealPrometheus(tmp_path, [job]) as prom:
        target = prom.wait_target_up()
        assert target["scrapeUrl"] == f"https://{daemon.address}/metrics"
        # The samples made it into the TSDB, not just a green target.
        assert prom.wait_value("sockscope_up") == "1"
