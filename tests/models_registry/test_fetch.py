"""The URL fetcher against a real HTTP server on the loopback interface.

Nothing in ``esd.fetch`` is mocked: the tests start a threaded ``http.server`` on 127.0.0.1 (and
on ::1 and a TLS listener where those matter) and let the fetcher resolve, check, connect and read for real. The
default guard refuses loopback, so most tests open it with ``allow_private=True`` or an allowed network.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from esd.fetch import (
    Guard,
    Probe,
    UrlNotAllowed,
    UrlNotReachable,
    address_allowed,
    filename_from_disposition,
    open_download,
    probe,
)

OPEN = Guard(allow_private=True)
BIG = random.Random(1234).randbytes(3 * 1024 * 1024)
SMALL = b"safetensors-ish bytes\n" * 100
SLEEP = 4  # how long the slow routes keep the client waiting; the tests use a 0.5 s timeout


@dataclass
class Server:
    base: str
    port: int
    requests: list[tuple[str, str]] = field(default_factory=list)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TestServer"

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self.route(body=False)

    def do_GET(self) -> None:
        self.route(body=True)

    def send(self, status: int, payload: bytes = b"", headers: dict[str, str] | None = None, body: bool = True):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def redirect(self, status: int, location: str | None) -> None:
        self.send(status, b"redirecting\n", {"Location": location} if location else {})

    def route(self, body: bool) -> None:
        self.server.log.append((self.command, self.path))  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        port = self.server.server_address[1]
        if path.startswith("/files/"):
            self.send(200, SMALL, body=body)
        elif path == "/big":
            self.send(200, BIG, body=body)
        elif path == "/to-big":
            self.redirect(301, "/big")
        elif path == "/cd/plain":
            self.send(200, SMALL, {"Content-Disposition": 'attachment; filename="plain name.safetensors"'}, body)
        elif path == "/cd/token":
            self.send(200, SMALL, {"Content-Disposition": "attachment; filename=token.ckpt"}, body)
        elif path == "/cd/star":
            disposition = "attachment; filename=\"fallback.bin\"; filename*=UTF-8''caf%C3%A9%20model.safetensors"
            self.send(200, SMALL, {"Content-Disposition": disposition}, body)
        elif path == "/host":
            # Echo the Host header as the file name, so a test can see what the fetcher sent.
            self.send(200, SMALL, {"Content-Disposition": f'attachment; filename="{self.headers["Host"]}"'}, body)
        elif path == "/no-size":
            # Close-delimited body: no Content-Length at all.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            if body:
                self.wfile.write(SMALL)
            self.close_connection = True
        elif path.startswith("/r/"):
            # /r/<n> is n redirects away from the file.
            hops = int(path.removeprefix("/r/"))
            status = (301, 302, 303, 307, 308)[hops % 5]
            if hops == 1:
                self.redirect(302, "/files/end%20of%20chain.safetensors")
            elif hops % 2:
                self.redirect(status, f"/r/{hops - 1}")  # absolute path
            else:
                self.redirect(status, f"{hops - 1}")  # relative to /r/
        elif path == "/loop":
            self.redirect(302, "/loop")
        elif path == "/redirect-without-location":
            self.redirect(302, None)
        elif path == "/api/download/models/123":
            self.redirect(307, "/files/real-name.safetensors?token=abc")
        elif path == "/api/download/models/456":
            self.redirect(307, f"http://127.0.0.1:{port}/files/my%20model%2Bv2.safetensors")
        elif path == "/to-other-host":
            self.redirect(302, f"http://127.0.0.2:{port}/files/elsewhere.safetensors")
        elif path == "/to-ftp":
            self.redirect(302, "ftp://example.com/model.safetensors")
        elif path == "/no-head":
            if self.command == "HEAD":
                self.send(405, b"", {"Allow": "GET"}, body=False)
            else:
                self.send(200, SMALL, {"Content-Disposition": 'attachment; filename="via-get.safetensors"'})
        elif path == "/slow":
            time.sleep(SLEEP)
            self.send(200, SMALL, body=body)
        elif path == "/stall":
            # Headers and the first bytes arrive, then the server goes quiet.
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            time.sleep(SLEEP)
        else:
            self.send(404, b"not found\n", body=body)


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that time out on purpose leave broken pipes behind


class QuietServer6(QuietServer):
    address_family = socket.AF_INET6


def _serve(server_class: type[QuietServer], host: str) -> Iterator[tuple[QuietServer, int]]:
    server = server_class((host, 0), Handler)
    server.log = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    for http_server, port in _serve(QuietServer, "127.0.0.1"):
        yield Server(base=f"http://127.0.0.1:{port}", port=port, requests=http_server.log)  # type: ignore[attr-defined]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ the guard


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/model.safetensors",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "http:///no-host.safetensors",
        "https://",
        "http://[::1/broken",
        "http://example.com:99999/x",
        "http://bad host.example/x",
    ],
)
def test_refuses_urls_that_are_not_plain_http_with_a_host(url):
    with pytest.raises(UrlNotAllowed) as caught:
        probe(url, OPEN)
    assert caught.value.url == url
    with pytest.raises(UrlNotAllowed), open_download(url, OPEN):
        pass


def test_default_guard_refuses_loopback(server):
    url = f"{server.base}/files/model.safetensors"
    with pytest.raises(UrlNotAllowed) as caught:
        probe(url, Guard())
    assert caught.value.url == url
    with pytest.raises(UrlNotAllowed), open_download(url, Guard()):
        pass


def test_default_guard_refuses_localhost_by_its_resolved_address(server):
    with pytest.raises(UrlNotAllowed):
        probe(f"http://localhost:{server.port}/files/model.safetensors", Guard())


def test_default_guard_refuses_numeric_tricks_for_loopback(server):
    # 2130706433 and 0x7f.1 are 127.0.0.1 to the resolver; the guard judges what they resolve to.
    for host in ("2130706433", "0x7f.1", "127.1"):
        with pytest.raises(UrlNotAllowed):
            probe(f"http://{host}:{server.port}/files/model.safetensors", Guard())


def test_refused_request_never_reaches_the_server(server):
    path = "/files/never-requested.safetensors"
    with pytest.raises(UrlNotAllowed):
        probe(f"{server.base}{path}", Guard())
    assert not [entry for entry in server.requests if entry[1] == path]


def test_allowed_network_opens_one_address(server):
    result = probe(f"{server.base}/files/model.safetensors", Guard(allowed_networks=("127.0.0.1/32",)))
    assert result.name == "model.safetensors"


def test_redirect_to_a_refused_address_is_refused_with_the_original_url(server):
    url = f"{server.base}/to-other-host"
    guard = Guard(allowed_networks=("127.0.0.1/32",))
    with pytest.raises(UrlNotAllowed) as caught:
        probe(url, guard)
    assert caught.value.url == url
    assert "127.0.0.2" in str(caught.value)  # the hop is named in the message
    with pytest.raises(UrlNotAllowed) as caught, open_download(url, guard):
        pass
    assert caught.value.url == url


def test_redirect_to_another_scheme_is_refused(server):
    with pytest.raises(UrlNotAllowed):
        probe(f"{server.base}/to-ftp", OPEN)


# ---------------------------------------------------------------------------------------- probe


def test_probe_name_and_size_from_a_plain_file(server):
    url = f"{server.base}/files/v1-5-pruned.safetensors?download=true#frag"
    assert probe(url, OPEN) == Probe(url=url, final_url=url, name="v1-5-pruned.safetensors", size=len(SMALL))
    assert ("HEAD", "/files/v1-5-pruned.safetensors?download=true") in server.requests


def test_probe_decodes_the_name_from_the_path(server):
    result = probe(f"{server.base}/files/my%20model%C3%A9.safetensors", OPEN)
    assert result.name == "my modelé.safetensors"


def test_probe_percent_encodes_what_cannot_go_on_the_request_line(server):
    result = probe(f"{server.base}/files/with space é.safetensors", OPEN)
    assert result.name == "with space é.safetensors"
    assert ("HEAD", "/files/with%20space%20%C3%A9.safetensors") in server.requests


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/cd/plain", "plain name.safetensors"),
        ("/cd/token", "token.ckpt"),
        ("/cd/star", "café model.safetensors"),
    ],
)
def test_probe_name_from_content_disposition(server, path, name):
    result = probe(f"{server.base}{path}", OPEN)
    assert result.name == name
    assert result.size == len(SMALL)


def test_probe_size_is_none_without_content_length(server):
    result = probe(f"{server.base}/no-size", OPEN)
    assert result.size is None
    assert result.name == "no-size"


def test_probe_sends_the_original_host_header(server):
    assert probe(f"http://localhost:{server.port}/host", OPEN).name == f"localhost:{server.port}"


def test_probe_follows_five_redirects(server):
    url = f"{server.base}/r/5"
    result = probe(url, OPEN)
    assert result.url == url
    assert result.final_url == f"{server.base}/files/end%20of%20chain.safetensors"
    assert result.name == "end of chain.safetensors"
    assert result.size == len(SMALL)


def test_probe_gives_up_after_five_redirects(server):
    with pytest.raises(UrlNotReachable):
        probe(f"{server.base}/r/6", OPEN)
    with pytest.raises(UrlNotReachable) as caught:
        probe(f"{server.base}/loop", OPEN)
    assert caught.value.url == f"{server.base}/loop"
    assert len([entry for entry in server.requests if entry[1] == "/loop"]) == 6  # the first ask and 5 redirects
    assert not [entry for entry in server.requests if entry[1].startswith("/r/0")]


def test_probe_redirect_without_location_is_not_reachable(server):
    with pytest.raises(UrlNotReachable):
        probe(f"{server.base}/redirect-without-location", OPEN)


def test_probe_falls_back_to_get_when_head_is_refused(server):
    result = probe(f"{server.base}/no-head", OPEN)
    assert result.name == "via-get.safetensors"
    assert result.size == len(SMALL)


def test_probe_404_is_not_reachable(server):
    with pytest.raises(UrlNotReachable) as caught:
        probe(f"{server.base}/missing.safetensors", OPEN)
    assert "404" in str(caught.value)


def test_probe_connection_refused_is_not_reachable(closed_port):
    with pytest.raises(UrlNotReachable):
        probe(f"http://127.0.0.1:{closed_port}/model.safetensors", OPEN)


def test_probe_unknown_host_is_not_reachable():
    with pytest.raises(UrlNotReachable):
        probe("http://no-such-host.invalid/model.safetensors", OPEN)


def test_probe_timeout_is_not_reachable(server):
    started = time.monotonic()
    with pytest.raises(UrlNotReachable):
        probe(f"{server.base}/slow", Guard(allow_private=True, timeout=0.5))
    assert time.monotonic() - started < SLEEP


def test_probe_civitai_takes_the_name_from_location_without_following(server):
    url = f"{server.base}/api/download/models/123?type=Model&format=SafeTensor"
    result = probe(url, OPEN)
    assert result == Probe(
        url=url,
        final_url=f"{server.base}/files/real-name.safetensors?token=abc",
        name="real-name.safetensors",
        size=None,
    )
    assert ("GET", "/api/download/models/123?type=Model&format=SafeTensor") in server.requests
    assert not [entry for entry in server.requests if entry[1].startswith("/files/real-name")]


def test_probe_civitai_decodes_an_absolute_location(server):
    result = probe(f"{server.base}/api/download/models/456", OPEN)
    assert result.name == "my model+v2.safetensors"
    assert result.final_url == f"{server.base}/files/my%20model%2Bv2.safetensors"


def test_probe_civitai_error_is_not_reachable(server):
    with pytest.raises(UrlNotReachable):
        probe(f"{server.base}/api/download/models/999", OPEN)


def test_probe_over_ipv6_brackets_the_host_header():
    try:
        servers = _serve(QuietServer6, "::1")
        _http_server, port = next(servers)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert probe(f"http://[::1]:{port}/host", OPEN).name == f"[::1]:{port}"
        with pytest.raises(UrlNotAllowed):
            probe(f"http://[::1]:{port}/host", Guard())
    finally:
        servers.close()


def _self_signed_context() -> ssl.SSLContext:
    """A server TLS context with a throwaway self-signed certificate for ``localhost``."""
    import tempfile
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context.load_cert_chain(cert_path, key_path)
    return context


def test_probe_https_sends_the_original_name_as_sni_and_verifies_the_certificate():
    """The connection is pinned to 127.0.0.1, yet TLS still speaks to and verifies ``localhost``; an untrusted
    certificate is a failure, not something to ignore."""
    context = _self_signed_context()
    seen: list[str | None] = []
    context.sni_callback = lambda _sock, server_name, _ctx: seen.append(server_name)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_once() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client rejects our certificate: expected

    thread = threading.Thread(target=accept_once, daemon=True)
    thread.start()
    try:
        with pytest.raises(UrlNotReachable):
            probe(f"https://localhost:{port}/model.safetensors", OPEN)
        thread.join(5)
    finally:
        listener.close()
    assert seen == ["localhost"]


# ---------------------------------------------------------------------------------------- download


def test_open_download_streams_the_exact_bytes(server):
    received = bytearray()
    with open_download(f"{server.base}/big", OPEN) as download:
        assert download.size == len(BIG)
        while chunk := download.read(64 * 1024):
            assert len(chunk) <= 64 * 1024
            received += chunk
    assert bytes(received) == BIG


def test_open_download_follows_redirects(server):
    with open_download(f"{server.base}/to-big", OPEN) as download:
        assert download.final_url == f"{server.base}/big"
        first = download.read(1000)
    assert first == BIG[:1000]  # leaving early closes the connection instead of reading 3 MB


def test_open_download_follows_a_redirect_chain_with_get(server):
    with open_download(f"{server.base}/r/3", OPEN) as download:
        assert download.read(len(SMALL) + 1) == SMALL
        assert download.read(10) == b""
    assert ("GET", "/r/3") in server.requests


def test_open_download_404_is_not_reachable(server):
    with pytest.raises(UrlNotReachable), open_download(f"{server.base}/missing.safetensors", OPEN):
        pass


def test_open_download_too_many_redirects_is_not_reachable(server):
    with pytest.raises(UrlNotReachable), open_download(f"{server.base}/r/6", OPEN):
        pass


def test_open_download_stall_mid_body_is_not_reachable(server):
    url = f"{server.base}/stall"
    with open_download(url, Guard(allow_private=True, timeout=0.5)) as download:
        assert download.size == 100
        with pytest.raises(UrlNotReachable) as caught:
            while download.read(50):
                pass
    assert caught.value.url == url


def test_download_read_needs_a_positive_size(server):
    with open_download(f"{server.base}/files/x.safetensors", OPEN) as download, pytest.raises(ValueError):
        download.read(0)


# ------------------------------------------------------------------------------- address predicate


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),  # noqa: S104
        ("255.255.255.255", False),
        ("224.0.0.1", False),  # multicast
        ("233.252.0.1", False),  # globally scoped multicast is still multicast
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("ff0e::1", False),
        # IPv4-mapped IPv6 is judged as the IPv4 address.
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.1.2.3", False),
        ("::ffff:169.254.169.254", False),
        ("::ffff:8.8.8.8", True),
        # Other IPv6 forms that carry an IPv4 address (NAT64, 6to4, IPv4-compatible) are judged by it too.
        ("64:ff9b::7f00:1", False),
        ("64:ff9b::808:808", True),
        ("2002:7f00:1::", False),
        ("2002:808:808::1", True),
        ("::7f00:1", False),
    ],
)
def test_address_allowed_by_default(ip, allowed):
    assert address_allowed(ip, Guard()) is allowed


def test_address_allowed_when_private_is_allowed():
    guard = Guard(allow_private=True)
    for ip in ("127.0.0.1", "10.0.0.1", "::1", "::ffff:127.0.0.1", "224.0.0.1", "8.8.8.8"):
        assert address_allowed(ip, guard)


def test_address_allowed_inside_allowed_networks_only():
    guard = Guard(allowed_networks=("10.2.0.0/16", "fd12:3456::/32"))
    assert address_allowed("10.2.0.1", guard)
    assert address_allowed("10.2.255.254", guard)
    assert address_allowed("::ffff:10.2.3.4", guard)  # mapped form of an allowed IPv4 address
    assert address_allowed("fd12:3456::7", guard)
    assert not address_allowed("10.3.0.1", guard)
    assert not address_allowed("::ffff:10.3.0.1", guard)
    assert not address_allowed("fd12:3457::7", guard)
    assert not address_allowed("127.0.0.1", guard)
    assert address_allowed("8.8.8.8", guard)  # public addresses stay allowed


def test_guard_rejects_a_malformed_network_at_once():
    with pytest.raises(ValueError):
        Guard(allowed_networks=("10.2.0.0/33",))
    assert Guard(allowed_networks=("10.2.0.1/16",)).allowed_networks == ("10.2.0.1/16",)  # host bits tolerated
    assert address_allowed("10.2.9.9", Guard(allowed_networks=("10.2.0.1/16",)))


def test_address_allowed_rejects_non_addresses():
    with pytest.raises(ValueError):
        address_allowed("example.com", Guard())
    assert ipaddress.ip_address("::ffff:127.0.0.1").ipv4_mapped is not None  # the premise of the mapped cases


# -------------------------------------------------------------------------------- content-disposition


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ('attachment; filename="a b.safetensors"', "a b.safetensors"),
        ("attachment; filename=a.ckpt", "a.ckpt"),
        ("attachment;filename=a.ckpt;size=12", "a.ckpt"),
        ('attachment; filename="semi;colon.ckpt"', "semi;colon.ckpt"),
        (r'attachment; filename="quote\"d.ckpt"', 'quote"d.ckpt'),
        ("attachment; filename*=UTF-8''x%20y.safetensors", "x y.safetensors"),
        ("attachment; filename*=utf-8'en'%E2%82%AC.bin", "€.bin"),
        ("attachment; filename*=ISO-8859-1''caf%E9.bin", "café.bin"),
        # The star form wins wherever it stands.
        ("attachment; filename*=UTF-8''star.bin; filename=\"plain.bin\"", "star.bin"),
        ("attachment; filename=\"plain.bin\"; filename*=UTF-8''star.bin", "star.bin"),
        # A broken star form falls back to the plain one.
        ("attachment; filename=\"plain.bin\"; filename*=UTF-8''%FF%FE", "plain.bin"),
        ('attachment; FILENAME="upper.bin"', "upper.bin"),
        ("filename=bare.bin", "bare.bin"),
        # Raw UTF-8 bytes read as latin-1 by http.client are put back together.
        ('attachment; filename="caf\u00c3\u00a9.bin"', "café.bin"),
        ('attachment; filename=""', None),
        ("attachment", None),
        ("inline; name=x", None),
        ("", None),
        (None, None),
    ],
)
def test_filename_from_disposition(header, name):
    assert filename_from_disposition(header) == name
