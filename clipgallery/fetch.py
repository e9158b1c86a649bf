"""Fetch an image by URL ("search by image URL") without becoming a proxy into private networks.

The URL comes from a user, so the server must not be talked into requesting its own admin
ports, the LAN, or a cloud metadata service (server-side request forgery). The rules:

* only http:// and https://, no user:password@, a host, at most 2048 characters;
* the host is resolved once per hop by the OS resolver, and *every* address it yields must be a
  public unicast address (`_forbidden_reason`). Odd spellings of addresses (2130706433,
  0x7f.1, 127.1, [::ffff:127.0.0.1], IDNA names) need no special casing: the resolver turns
  them into the address the OS would connect to, and that address is checked (httpx's URL
  parser already rejects some, such as 0177.0.0.1);
* the connection goes to one of exactly those checked addresses (`_PinnedBackend`), so a DNS
  answer that changes between check and connect (DNS rebinding) gains nothing. The request still
  carries the original Host header, and TLS still verifies the certificate for the host name;
* redirects are followed by hand, each new URL checked from scratch, at most `max_redirects`;
* the body is streamed and abandoned as soon as it passes `max_bytes`, and one deadline bounds
  the whole call (DNS, connect, TLS, headers, body, every redirect), so a server that drips
  one byte at a time cannot hold a worker.

Only httpcore (httpx's own transport layer) is used, not an httpx.Client: a Client would honour
HTTP(S)_PROXY variables, which would send the request to the proxy instead of the pinned
address, and offers no supported way to choose the address a connection goes to.
"""

from __future__ import annotations

import http
import ipaddress
import logging
import socket
import ssl
import threading
import time
import typing
from collections.abc import Iterable
from functools import lru_cache

import httpcore
import httpx

if typing.TYPE_CHECKING:
    from clipgallery.config import Settings

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "clipgallery-image-fetch/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_PUBLIC_ONLY = "clipgallery only fetches images from public addresses."

# Instance metadata services hand out cloud credentials. Most live in ranges refused anyway, but
# they are named here so the refusal says what they are and stays if a range rule ever changes;
# Azure's WireServer (168.63.129.16) is a public-looking address reachable only from inside Azure.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, DigitalOcean, OpenStack, ...
        "fd00:ec2::254",  # AWS over IPv6
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer
    )
)

# Refused even where an `is_global` of some Python version says otherwise (3.11's says 224/4 is
# global, for one); special-purpose registries (RFC 6890 and successors) per family.
_EXTRA_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
_EXTRA_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/8",
        "64:ff9b:1::/48",  # NAT64 for local use (RFC 8215): translates into private space
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "5f00::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED_V4 = ipaddress.IPv4Network("100.64.0.0/10")
_THIS_NETWORK_V4 = ipaddress.IPv4Network("0.0.0.0/8")


class FetchError(ValueError):
    """The image could not be fetched; str(exc) is a reason fit to show the user.

    `status` is the HTTP status an API should answer with: 400 for a bad or forbidden URL,
    413 for an image over the size limit, 502 for a failing or misbehaving remote server,
    504 when the time limit ran out.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def fetch_image_bytes(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 10.0,
    allow_hosts: frozenset[str] = frozenset(),
    max_redirects: int = 3,
) -> tuple[bytes, str]:
    """GET `url` from a public address and return (body, final_url). Raises FetchError.

    `timeout` bounds the whole call in seconds, redirects included. `allow_hosts` names hosts
    (as written in a URL, compared lower-case) whose addresses are not checked: a test-only
    escape hatch for loopback servers. The body is returned unexamined; whether it is an image
    is for the caller to decide (by decoding it, not by trusting Content-Type).
    """
    if max_bytes < 1 or timeout <= 0 or max_redirects < 0:
        raise ValueError("max_bytes and timeout must be positive and max_redirects at least 0")
    deadline = time.monotonic() + timeout
    allowed = frozenset(_normalise_host(h) for h in allow_hosts if h.strip())

    target = _parse_url(url)
    previous: httpx.URL | None = None
    redirects = 0
    while True:
        try:
            body, location = _get(target, max_bytes=max_bytes, timeout=timeout, deadline=deadline, allowed=allowed)
        except FetchError as exc:
            if previous is not None and exc.status == 400:
                # The user typed a public URL; say that the forbidden place was a redirect target.
                raise FetchError(f"{previous.host} redirected to {target.host}: {exc}", 400) from None
            raise
        if location is None:
            return typing.cast(bytes, body), str(target)
        if redirects >= max_redirects:
            raise FetchError(
                f"{target.host} redirected more than {max_redirects} times; the image was not fetched.", 502
            )
        redirects += 1
        previous, target = target, _redirect_target(target, location)


def fetch_for_settings(url: str, settings: Settings) -> tuple[bytes, str]:
    """fetch_image_bytes with the upload size limit and the allowed hosts of `settings`."""
    return fetch_image_bytes(url, max_bytes=settings.max_upload_bytes, allow_hosts=settings.fetch_allow_hosts)


def _parse_url(url: object) -> httpx.URL:
    """Check the form of a URL (not yet where it points) and return it without its fragment."""
    if not isinstance(url, str) or not url.strip():
        raise FetchError("Enter the address (URL) of an image, starting with http:// or https://.")
    text = url.strip()
    if len(text) > MAX_URL_LENGTH:
        raise FetchError(f"The URL is too long; at most {MAX_URL_LENGTH} characters are accepted.")
    # Parsers disagree about control characters and backslashes (WHATWG reads "\" as "/"), which is
    # how URL-confusion tricks work; nothing legitimate needs them unescaped.
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in text):
        raise FetchError("The URL contains control characters or backslashes.")
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise FetchError(f"That is not a valid URL ({exc}).") from None
    if parsed.scheme not in ("http", "https"):
        raise FetchError("Only http:// and https:// URLs can be fetched.")
    authority = text.split("://", 1)[1] if "://" in text else ""
    for stop in "/?#":
        authority = authority.split(stop, 1)[0]
    if parsed.userinfo or "@" in authority:
        raise FetchError("URLs with a user name or password (user:pass@) are not accepted.")
    if not parsed.host:
        raise FetchError("The URL has no host name.")
    if "%" in parsed.host:
        # Percent-escapes or IPv6 zone ids in a host: no public image host needs either.
        raise FetchError(f"{parsed.host} is not a valid host name.")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise FetchError(f"{parsed.port} is not a valid port number.")
    return parsed.copy_with(fragment=None)


def _forbidden_reason(ip: IPAddress) -> str | None:
    """Why connecting to `ip` is refused ("a private address", ...), or None if it is public.

    `is_global` is the main rule; the explicit checks refuse more, never less, and name the kind
    of address so the user learns what was wrong.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses with an IPv4 address inside reach that IPv4 host, so judge the embedded one.
        mapped = ip.ipv4_mapped
        if mapped is not None:
            inner = _forbidden_reason(mapped)
            return f"an IPv4-mapped IPv6 address (for {mapped}{', ' + inner if inner else ''})"
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            inner = _forbidden_reason(embedded)
            # On IPv6-only networks DNS64 answers every IPv4-only site this way; those are fine.
            return f"a NAT64 address for {embedded}, {inner}" if inner else None
        if ip.sixtofour is not None:
            inner = _forbidden_reason(ip.sixtofour)
            if inner:
                return f"a 6to4 address for {ip.sixtofour}, {inner}"
        if ip.teredo is not None:
            return "a Teredo tunnel address"
        if int(ip) >> 32 == 0 and int(ip) > 1:
            return f"an IPv4-compatible IPv6 address (for {ipaddress.IPv4Address(int(ip))})"
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata service address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _SHARED_V4:
            return "a shared (carrier-grade NAT) address"
        if ip in _THIS_NETWORK_V4:
            return "a 'this network' address"
    elif ip.is_site_local:
        return "a site-local address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    extra = _EXTRA_V4 if isinstance(ip, ipaddress.IPv4Address) else _EXTRA_V6
    if not ip.is_global or any(ip in net for net in extra):
        return "a special-purpose address, not a public one"
    return None


def _resolve(host: str, port: int) -> list[str]:
    """Every address the OS resolver gives for `host`, in its order. Tests replace this."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in found:
            found.append(str(sockaddr[0]))
    return found


def _resolve_within(host: str, port: int, deadline: float) -> list[IPAddress]:
    # getaddrinfo has no timeout of its own; a thread lets a stuck resolver cost us only the
    # time left (the thread finishes on its own when the resolver gives up).
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["addresses"] = _resolve(host, port)
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="clipgallery-fetch-resolve", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        raise FetchError(f"Looking up the address of {host} took too long.", 504)
    error = outcome.get("error")
    if isinstance(error, (OSError, UnicodeError)):
        raise FetchError(f"The host name {host} could not be found.", 400)
    if error is not None:
        raise typing.cast(Exception, error)
    addresses: list[IPAddress] = []
    for text in typing.cast(list[str], outcome["addresses"]):
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise FetchError(f"The host name {host} resolved to something that is not an address.") from None
    if not addresses:
        raise FetchError(f"The host name {host} could not be found.", 400)
    return addresses


def _clamp(timeout: float | None, deadline: float, expired: type[Exception]) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        # Raised here rather than passing 0 on: a 0 timeout makes the socket non-blocking, which
        # fails with a network error instead of a timeout.
        raise expired("the time limit for fetching the image ran out")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """Caps every socket wait at the time left, so many short waits cannot add up past the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, self._deadline, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, self._deadline, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name, not the pinned address: SNI and certificate
        # verification work as if we had connected by name.
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _clamp(timeout, self._deadline, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses of one origin, and nowhere else.

    httpcore passes the URL's host to connect_tcp; the standard backend would resolve it again
    (a second DNS answer, which a rebinding attacker controls). This one ignores the name and
    dials the addresses that passed the checks.
    """

    def __init__(self, host: str, port: int, addresses: list[IPAddress], deadline: float) -> None:
        self._host = host.lower()
        self._port = port
        self._addresses = addresses
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        if host.lower() != self._host or port != self._port:
            # Only possible if httpcore ever dialled something other than the request's origin
            # (a proxy, say); the pinned addresses do not belong to that, so refuse.
            raise httpcore.ConnectError(f"unexpected connection to {host}:{port}")
        error: Exception | None = None
        for address in self._addresses:
            try:
                stream = self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=_clamp(timeout, self._deadline, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc  # try the host's next address, as a browser would
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error or httpcore.ConnectError("no address to connect to")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[typing.Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for fetching images")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    return httpcore.default_ssl_context()  # certifi's CAs, hostname checks on: the same as httpx


def _normalise_host(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]")


def _get(
    url: httpx.URL, *, max_bytes: int, timeout: float, deadline: float, allowed: frozenset[str]
) -> tuple[bytes | None, str | None]:
    """One hop: (body, None) for a 2xx answer, (None, Location) for a redirect."""
    host = url.raw_host.decode("ascii")
    shown = url.host  # the Unicode form of an IDNA name, for messages
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = _resolve_within(host, port, deadline)
    if _normalise_host(url.host) not in allowed and _normalise_host(host) not in allowed:
        for ip in addresses:
            reason = _forbidden_reason(ip)
            if reason:
                log.info("Refused to fetch an image from %s (%s): %s", shown, ip, reason)
                if _normalise_host(host) == str(ip):
                    raise FetchError(f"{shown} is {reason}; {_PUBLIC_ONLY}")
                raise FetchError(f"The address of {shown} ({ip}) is {reason}; {_PUBLIC_ONLY}")

    request_url = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
    headers = [
        (b"Host", url.netloc),  # netloc keeps the brackets of an IPv6 literal; httpcore's default drops them
        (b"User-Agent", USER_AGENT.encode()),
        (b"Accept", b"image/*"),
        # Compressed bodies would make max_bytes count the wrong thing and invite zip bombs.
        (b"Accept-Encoding", b"identity"),
        (b"Connection", b"close"),
    ]
    pool = httpcore.ConnectionPool(
        ssl_context=_ssl_context(),
        network_backend=_PinnedBackend(host, port, addresses, deadline),
        max_connections=1,
        retries=0,
    )
    extensions = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
    try:
        with pool, pool.stream("GET", request_url, headers=headers, extensions=extensions) as response:
            return _read_response(response, shown, max_bytes)
    except httpcore.TimeoutException:
        raise FetchError(f"{shown} did not send the image within the time limit.", 504) from None
    except httpcore.ConnectError as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise FetchError(f"The HTTPS certificate of {shown} could not be verified.", 502) from None
        raise FetchError(f"Could not connect to {shown}.", 502) from None
    except (httpcore.NetworkError, httpcore.ProtocolError):
        raise FetchError(f"The connection to {shown} failed while fetching the image.", 502) from None


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _read_response(response: httpcore.Response, shown: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    status = response.status
    if status in REDIRECT_STATUSES:
        location = _header(response, b"location")
        if not location:
            raise FetchError(f"{shown} answered with a redirect (HTTP {status}) but gave no address.", 502)
        return None, location
    if not 200 <= status < 300:
        try:
            phrase = f" {http.HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        raise FetchError(f"{shown} answered HTTP {status}{phrase} instead of the image.", 502)
    encoding = (_header(response, b"content-encoding") or "identity").lower()
    if encoding != "identity":
        raise FetchError(f"{shown} sent the image compressed ({encoding}), which is not accepted.", 502)
    too_large = FetchError(f"The image at {shown} is larger than the limit of {_describe_size(max_bytes)}.", 413)
    declared = _header(response, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_stream():
        received += len(chunk)
        if received > max_bytes:
            raise too_large  # leaving the `with` closes the connection without reading on
        chunks.append(chunk)
    return b"".join(chunks), None


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL:
    try:
        joined = current.join(location)
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise FetchError(f"{current.host} redirected to an invalid URL.", 502) from None
    try:
        return _parse_url(str(joined))
    except FetchError as exc:
        raise FetchError(f"{current.host} redirected to a URL that is not accepted: {exc}", exc.status) from None


def _describe_size(n: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"
