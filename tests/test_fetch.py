"""Fetching images by URL: SSRF refusals, IP pinning, redirects, size and time limits.

Everything runs against servers on 127.0.0.1 (reached only through allow_hosts) and a replaced
resolver; nothing needs the internet.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from clipgallery import fetch
from clipgallery.config import Settings, load_settings
from clipgallery.fetch import FetchError, fetch_for_settings, fetch_image_bytes

# A valid 1x1 PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201d1b1"
    "c0530000000049454e44ae426082"
)
LOCAL = frozenset({"127.0.0.1"})
BIG = 64 * 1024 * 1024  # far more than loopback socket buffers hold, so an early stop shows


# --- helpers ---------------------------------------------------------------------------------


class Listener:
    """A TCP port nobody answers; any connection to it stays in the accept queue as evidence."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        self.sock.setblocking(False)
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def listener() -> Iterator[Listener]:
    quiet = Listener()
    yield quiet
    quiet.sock.close()


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address a TCP connection was attempted to; only loopback ones really connect."""
    attempts: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        attempts.append((address[0], address[1]))
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise OSError(101, "Network is unreachable (test)")
        return real(address, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "create_connection", spy)
    return attempts


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str] | Callable[[], list[str]]]) -> list:
    """Replace the resolver with a table; returns the list of (host, port) look-ups made."""
    calls: list[tuple[str, int]] = []
    real = fetch._resolve

    def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        if host in answers:
            answer = answers[host]
            return answer() if callable(answer) else answer
        return real(host, port)

    monkeypatch.setattr(fetch, "_resolve", resolve)
    return calls


@dataclass
class Record:
    paths: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    done: dict[str, threading.Event] = field(default_factory=dict)


class Handler(BaseHTTPRequestHandler):
    record: Record

    def log_message(self, format: str, *args: object) -> None:
        pass

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def head(self, status: str, *headers: str) -> None:
        self.raw(("HTTP/1.1 " + status + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode())

    def stream(self, name: str, total: int, chunked: bool = False) -> None:
        sent = 0
        block = b"\0" * 65536
        try:
            while sent < total:
                self.raw(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
                sent += len(block)
        except OSError:
            pass  # the client hung up, as it should
        finally:
            self.record.sent[name] = sent
            self.record.done[name].set()

    def do_GET(self) -> None:
        self.close_connection = True
        record = self.record
        record.paths.append(self.path)
        record.hosts.append(self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/image.png":
            self.head("200 OK", "Content-Type: image/png", f"Content-Length: {len(PNG)}", "Connection: close")
            self.raw(PNG)
        elif path == "/big-declared":
            self.head("200 OK", "Content-Type: image/png", f"Content-Length: {BIG}", "Connection: close")
            self.stream(path, BIG)
        elif path == "/big-undeclared":  # body ends when the connection does
            self.head("200 OK", "Content-Type: image/png", "Connection: close")
            self.stream(path, BIG)
        elif path == "/big-chunked":
            self.head("200 OK", "Content-Type: image/png", "Transfer-Encoding: chunked", "Connection: close")
            self.stream(path, BIG, chunked=True)
        elif path == "/drip-body":
            self.head("200 OK", "Content-Type: image/png", "Content-Length: 1000", "Connection: close")
            self.drip(b"x" * 1000)
        elif path == "/drip-headers":
            self.drip(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"y" * 1000)
        elif path == "/stall":  # each wait is shorter than the timeout, together they are longer
            time.sleep(0.6)
            self.head("200 OK", "Content-Type: image/png", "Content-Length: 1000", "Connection: close")
            time.sleep(0.6)
            self.raw(b"x")
            time.sleep(5)
        elif path == "/redirect":
            self.head(query.get("status", ["302"])[0] + " Found", f"Location: {query['to'][0]}", "Content-Length: 0")
        elif path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            target = f"/hop/{left - 1}" if left > 0 else "/image.png"
            self.head("301 Moved Permanently", f"Location: {target}", "Content-Length: 0")
        elif path == "/gzip":
            self.head("200 OK", "Content-Type: image/png", "Content-Encoding: gzip", "Content-Length: 4")
            self.raw(b"\x1f\x8b\x08\x00")
        else:
            self.head("404 Not Found", "Content-Type: text/plain", "Content-Length: 9")
            self.raw(b"not here\n")

    def drip(self, data: bytes) -> None:
        try:
            for i in range(len(data)):
                self.raw(data[i : i + 1])
                time.sleep(0.5)
        except OSError:
            pass


@dataclass
class Server:
    base: str
    port: int
    record: Record

    def url(self, path: str) -> str:
        return self.base + path


def serve(tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    record = Record(done={p: threading.Event() for p in ("/big-declared", "/big-undeclared", "/big-chunked")})
    handler = type("BoundHandler", (Handler,), {"record": record})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    yield Server(f"{'https' if tls else 'http'}://127.0.0.1:{port}", port, record)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serve()


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA and a certificate it signed for images.example only."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=clipgallery test CA")
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.example")
    (d / "leaf.ext").write_text(
        "subjectAltName=DNS:images.example\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    run(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext",
    )  # fmt: skip
    return Certificates(d / "ca.pem", d / "leaf.pem", d / "leaf.key")


@pytest.fixture
def tls_server(certificates: Certificates, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, list[str]]]:
    """An HTTPS server on 127.0.0.1 with the images.example certificate, trusted by the fetcher.

    Yields the server and the SNI names clients sent."""
    names: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name) and None
    trusting = ssl.create_default_context(cafile=str(certificates.ca))
    monkeypatch.setattr(fetch, "_ssl_context", lambda: trusting)
    for server in serve(context):
        yield server, names


def refused(url: str, status: int = 400, **kwargs: object) -> FetchError:
    kwargs.setdefault("max_bytes", 1024 * 1024)
    with pytest.raises(FetchError) as caught:
        fetch_image_bytes(url, **kwargs)  # type: ignore[arg-type]
    assert caught.value.status == status, str(caught.value)
    return caught.value


# --- refused before any connection -----------------------------------------------------------

FORBIDDEN = [
    "http://127.0.0.1:{port}/",
    "https://127.0.0.1:{port}/",
    "http://localhost:{port}/",
    "http://LOCALHOST:{port}/",
    "http://localhost.:{port}/",
    "http://127.0.0.1.:{port}/",
    "http://[::1]:{port}/",
    "http://[::]:{port}/",
    "http://2130706433:{port}/",
    "http://017700000001:{port}/",
    "http://0177.0.0.1:{port}/",
    "http://0x7f.0.0.1:{port}/",
    "http://0x7f.1:{port}/",
    "http://127.1:{port}/",
    "http://127.0.0.2:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://[::ffff:7f00:1]:{port}/",
    "http://[::127.0.0.1]:{port}/",
    "http://[64:ff9b::7f00:1]:{port}/",
    "http://[2002:7f00:1::1]:{port}/",
    "http://%31%32%37.0.0.1:{port}/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fe80::1%25lo]:{port}/",
    "http://[fd00::1]/",
    "http://[fec0::1]/",
    "http://0.0.0.0:{port}/",
    "http://0:{port}/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://[ff02::1]/",
    "http://[64:ff9b::a00:1]/",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    "file:///etc/passwd",
    "ftp://x/",
    "gopher://x/",
    "javascript:alert(1)",
    "data:image/png;base64,iVBORw0KGgo=",
    "http://user:pw@example.com/",
    "http://@127.0.0.1:{port}/",
    "http://example.com@127.0.0.1:{port}/",
    "http://a\\@127.0.0.1:{port}/",
    "http://127.0.0.1:{port}\\@example.com/",
    "http://example.com:99999/",
    "http:///etc/passwd",
    "http://exa mple.com/",
    "http://example.com/\r\nX-Injected: 1",
    "http://example.com/" + "a" * 2048,
    "",
    "   ",
    "not a url",
]


@pytest.mark.parametrize("template", FORBIDDEN)
def test_forbidden_urls_are_refused_without_connecting(
    template: str, listener: Listener, connects: list[tuple[str, int]]
) -> None:
    error = refused(template.format(port=listener.port))
    assert str(error)
    assert connects == []
    assert listener.connections() == 0


def test_refusal_names_host_address_and_reason(listener: Listener) -> None:
    assert str(refused(f"http://2130706433:{listener.port}/")) == (
        "The address of 2130706433 (127.0.0.1) is a loopback address; "
        "clipgallery only fetches images from public addresses."
    )
    assert "169.254.169.254 is a cloud metadata service address" in str(refused("http://169.254.169.254/"))
    assert "Only http:// and https://" in str(refused("file:///etc/passwd"))
    assert "user name or password" in str(refused("http://user:pw@example.com/"))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "169.254.1.1",
        "100.64.0.1",
        "100.127.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.0.192",
        "192.0.2.1",
        "198.18.0.1",
        "168.63.129.16",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:8.8.8.8",
        "::10.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::808:808",
        "2002:7f00:1::1",
        "2002:c0a8:101::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001:db8::1",
        "fc00::1",
        "fd00::1",
        "fd00:ec2::254",
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "100::1",
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert fetch._forbidden_reason(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert fetch._forbidden_reason(ipaddress.ip_address(address)) is None


# --- DNS: every address checked, resolved once, connection pinned ----------------------------


def test_name_resolving_to_a_private_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, connects: list[tuple[str, int]]
) -> None:
    fake_dns(monkeypatch, {"example.internal": ["10.0.0.5"]})
    assert str(refused("http://example.internal/cat.png")) == (
        "The address of example.internal (10.0.0.5) is a private address; "
        "clipgallery only fetches images from public addresses."
    )
    assert connects == []


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch, connects: list[tuple[str, int]]) -> None:
    fake_dns(monkeypatch, {"mixed.example": ["93.184.215.14", "2606:4700::1", "10.0.0.1"]})
    assert "(10.0.0.1) is a private address" in str(refused("http://mixed.example/"))
    assert connects == []


def test_idna_names_are_resolved_in_ascii_and_checked(
    monkeypatch: pytest.MonkeyPatch, connects: list[tuple[str, int]]
) -> None:
    calls = fake_dns(monkeypatch, {"xn--bcher-kva.example": ["10.0.0.5"]})
    error = refused("http://BÜCHER.example/")
    assert calls == [("xn--bcher-kva.example", 80)]
    assert "bücher.example (10.0.0.5) is a private address" in str(error)
    assert connects == []


def test_dns_rebinding_connects_only_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, listener: Listener, connects: list[tuple[str, int]]
) -> None:
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    calls = fake_dns(monkeypatch, {"rebind.example": lambda: next(answers)})
    error = refused(f"http://rebind.example:{listener.port}/", status=502)
    assert "Could not connect to rebind.example" in str(error)
    # One look-up; the connection went to the address that was checked, never to the second answer.
    assert calls == [("rebind.example", listener.port)]
    assert connects == [("93.184.215.14", listener.port)]
    assert listener.connections() == 0


def test_connection_is_pinned_but_keeps_the_host_header(monkeypatch: pytest.MonkeyPatch, server: Server) -> None:
    fake_dns(monkeypatch, {"images.example": ["127.0.0.1"]})
    url = f"http://images.example:{server.port}/image.png"
    body, final = fetch_image_bytes(url, max_bytes=1024, allow_hosts=frozenset({"images.example"}))
    assert (body, final) == (PNG, url)
    assert server.record.hosts == [f"images.example:{server.port}"]
    # allow_hosts admits exactly the hosts it names: the same address under another name is refused.
    fake_dns(monkeypatch, {"other.example": ["127.0.0.1"]})
    refused(f"http://other.example:{server.port}/image.png", allow_hosts=frozenset({"images.example"}))
    assert len(server.record.paths) == 1


def test_https_to_a_pinned_address_verifies_the_certificate_for_the_host_name(
    monkeypatch: pytest.MonkeyPatch, tls_server: tuple[Server, list[str]], connects: list[tuple[str, int]]
) -> None:
    server, sni = tls_server
    fake_dns(monkeypatch, {"images.example": ["127.0.0.1"], "wrong.example": ["127.0.0.1"]})
    url = f"https://images.example:{server.port}/image.png"
    allow = frozenset({"images.example", "wrong.example", "127.0.0.1"})
    assert fetch_image_bytes(url, max_bytes=1024, allow_hosts=allow) == (PNG, url)
    assert connects == [("127.0.0.1", server.port)]
    assert sni == ["images.example"]
    assert server.record.hosts == [f"images.example:{server.port}"]
    # The same server under a name (or address) its certificate does not cover is not trusted.
    for other in (f"https://wrong.example:{server.port}/image.png", server.url("/image.png")):
        error = refused(other, status=502, allow_hosts=allow)
        assert "certificate" in str(error)
    assert len(server.record.paths) == 1


def test_slow_resolver_counts_against_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(fetch, "_resolve", lambda host, port: release.wait(10) and [])
    started = time.monotonic()
    try:
        refused("http://slow-dns.example/", status=504, timeout=0.5)
    finally:
        release.set()
    assert time.monotonic() - started < 1.5


def test_unknown_host_is_a_bad_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(fetch, "_resolve", fail)
    assert "could not be found" in str(refused("http://no-such-host.example/"))


# --- real fetches from the loopback test server ----------------------------------------------


def test_fetches_an_image(server: Server) -> None:
    body, final = fetch_image_bytes(server.url("/image.png#frag"), max_bytes=1024, allow_hosts=LOCAL)
    assert body == PNG
    assert final == server.url("/image.png")
    assert server.record.hosts == [f"127.0.0.1:{server.port}"]


def test_allow_hosts_admits_only_the_named_host(server: Server, connects: list[tuple[str, int]]) -> None:
    refused(f"http://localhost:{server.port}/image.png", allow_hosts=LOCAL)
    assert connects == []
    assert server.record.paths == []


@pytest.mark.parametrize("path", ["/big-declared", "/big-undeclared", "/big-chunked"])
def test_too_large_body_stops_early(server: Server, path: str) -> None:
    started = time.monotonic()
    error = refused(server.url(path), status=413, max_bytes=1024 * 1024, allow_hosts=LOCAL)
    assert "larger than the limit of 1 MB" in str(error)
    assert server.record.done[path].wait(5), "the server is still sending: the client did not hang up"
    assert server.record.sent[path] < BIG // 4
    assert time.monotonic() - started < 5


def test_slow_drip_body_hits_the_overall_deadline(server: Server) -> None:
    started = time.monotonic()
    error = refused(server.url("/drip-body"), status=504, timeout=2, allow_hosts=LOCAL)
    assert 1.8 < time.monotonic() - started < 3
    assert "time limit" in str(error)


def test_slow_drip_headers_hit_the_overall_deadline(server: Server) -> None:
    started = time.monotonic()
    refused(server.url("/drip-headers"), status=504, timeout=1, allow_hosts=LOCAL)
    assert time.monotonic() - started < 2


def test_no_single_wait_outlasts_the_overall_deadline(server: Server) -> None:
    started = time.monotonic()
    refused(server.url("/stall"), status=504, timeout=1.5, allow_hosts=LOCAL)
    assert time.monotonic() - started < 1.9


def test_error_status_is_an_upstream_error(server: Server) -> None:
    error = refused(server.url("/missing"), status=502, allow_hosts=LOCAL)
    assert "404" in str(error)
    assert "not here" not in str(error)


def test_compressed_body_is_refused(server: Server) -> None:
    assert "compressed" in str(refused(server.url("/gzip"), status=502, allow_hosts=LOCAL))


# --- redirects --------------------------------------------------------------------------------


def test_relative_redirect_is_followed(server: Server) -> None:
    body, final = fetch_image_bytes(server.url("/redirect?to=/image.png"), max_bytes=1024, allow_hosts=LOCAL)
    assert body == PNG
    assert final == server.url("/image.png")


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/image.png",
        "http://localhost:{port}/image.png",
        "http://2130706433:{port}/image.png",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1:{port}/image.png",
    ],
)
def test_redirect_targets_are_checked_again(server: Server, connects: list[tuple[str, int]], target: str) -> None:
    location = target.format(port=server.port)
    error = refused(server.url(f"/redirect?to={location}&status=307"), allow_hosts=LOCAL)
    assert str(error).startswith("127.0.0.1 redirected to"), str(error)
    assert connects == [("127.0.0.1", server.port)]  # the first hop only
    assert len(server.record.paths) == 1


def test_redirect_to_a_rebinding_name_is_checked_at_that_hop(
    monkeypatch: pytest.MonkeyPatch, server: Server, connects: list[tuple[str, int]]
) -> None:
    calls = fake_dns(monkeypatch, {"evil.example": ["10.9.8.7"]})
    error = refused(server.url("/redirect?to=http://evil.example/"), allow_hosts=LOCAL)
    assert "evil.example (10.9.8.7) is a private address" in str(error)
    assert calls[-1] == ("evil.example", 80)
    assert connects == [("127.0.0.1", server.port)]


def test_redirect_chain_is_limited(server: Server) -> None:
    body, final = fetch_image_bytes(server.url("/hop/2"), max_bytes=1024, allow_hosts=LOCAL, max_redirects=3)
    assert (body, final) == (PNG, server.url("/image.png"))
    error = refused(server.url("/hop/3"), status=502, allow_hosts=LOCAL, max_redirects=3)
    assert "redirected more than 3 times" in str(error)
    assert server.record.paths[4:] == ["/hop/3", "/hop/2", "/hop/1", "/hop/0"]
    refused(server.url("/redirect?to=/image.png"), status=502, allow_hosts=LOCAL, max_redirects=0)


# --- settings ----------------------------------------------------------------------------------


def test_fetch_for_settings_uses_the_upload_limit_and_allowed_hosts(server: Server) -> None:
    settings = Settings(max_upload_bytes=len(PNG), fetch_allow_hosts=LOCAL)
    assert fetch_for_settings(server.url("/image.png"), settings) == (PNG, server.url("/image.png"))
    with pytest.raises(FetchError) as caught:
        fetch_for_settings(server.url("/image.png"), Settings(max_upload_bytes=len(PNG) - 1, fetch_allow_hosts=LOCAL))
    assert caught.value.status == 413
    with pytest.raises(FetchError) as caught:
        fetch_for_settings(server.url("/image.png"), Settings())
    assert caught.value.status == 400


def test_allow_hosts_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPGALLERY_FETCH_ALLOW_HOSTS", raising=False)
    assert load_settings().fetch_allow_hosts == frozenset()
    monkeypatch.setenv("CLIPGALLERY_FETCH_ALLOW_HOSTS", " 127.0.0.1, LocalHost ,,")
    assert load_settings().fetch_allow_hosts == frozenset({"127.0.0.1", "localhost"})
