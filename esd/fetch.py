"""Outbound HTTP to URLs users give (a checkpoint by URL, a webhook): what a URL delivers, streaming it, posting.

It is plumbing because two rooms need it (apps.models_registry downloads checkpoints, apps.accounts delivers
webhooks), and neither may know about the other.

Registering a model by URL makes this server fetch whatever a user points it at, which is the textbook
server-side request forgery hole: ``http://169.254.169.254/`` (cloud metadata), ``http://localhost:5432/``,
an intranet host, or a public URL that redirects to any of those. Everything here exists to close it:

* only ``http``/``https`` URLs with a host are accepted;
* the host is resolved once, here, and *every* address it resolves to must be allowed (public, or inside a
  network the operator allowed explicitly, or everything when the operator says the server is private);
* the connection then goes to one of those checked addresses and nowhere else: urllib3 is given the IP, not
  the name, so it cannot do a second DNS lookup that a hostile resolver answers differently (DNS rebinding).
  The original name still travels in ``Host``, in TLS SNI and in certificate verification;
* redirects are never followed by urllib3; we follow them ourselves so that every hop goes through the same
  check and the same pinning.

This module knows nothing about Django: settings come in as a :class:`Guard`, results go out as plain values and
two exceptions. Judging the name (extension, path separators) and capping the size are the caller's job.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, unquote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error

__all__ = [
    "MAX_REDIRECTS",
    "Download",
    "Guard",
    "Probe",
    "Reply",
    "UrlNotAllowed",
    "UrlNotReachable",
    "address_allowed",
    "check_url",
    "filename_from_disposition",
    "open_download",
    "post",
    "probe",
]

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# A server that does not implement HEAD answers one of these; the probe then asks with GET instead.
_HEAD_REFUSED_STATUSES = frozenset({405, 501})
_CIVITAI_MARKER = "/api/download/models/"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_USER_AGENT = "esd-server model registry"
# Host names after IDNA encoding: letters, digits, dots, hyphens (and underscores, which some real hosts use).
_HOSTNAME_RE = re.compile(r"^[a-z0-9_.-]+$", re.IGNORECASE)
# IPv6 ranges whose addresses carry an IPv4 address that a tunnel or translator may end up talking to.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# One ``; key=value`` parameter of a header such as Content-Disposition; the value is a quoted string or a token.
_HEADER_PARAM_RE = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True)
class Guard:
    """What the operator allows the server to connect to.

    ``allow_private=True`` turns the guard off (a server on a closed network that fetches from its own
    mirrors). ``allowed_networks`` opens single networks instead, e.g. ``("10.2.0.0/16",)`` for an internal
    mirror, while everything else private stays refused. ``timeout`` applies to connecting and to every read.
    """

    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    timeout: float = 15.0

    def __post_init__(self) -> None:
        # Fail where the settings are turned into a Guard, not at the first download: a typo in a CIDR
        # should stop the server from starting, not silently refuse every URL later.
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        _parse_networks(self.allowed_networks)


class _FetchError(Exception):
    """Base of the two errors; ``url`` is always the URL the caller gave, even when a later hop failed."""

    def __init__(self, url: str, reason: str = "") -> None:
        super().__init__(reason or url)
        self.url = url
        self.reason = reason


class UrlNotAllowed(_FetchError):
    """The URL (or a redirect it leads to) is not something the guard lets the server connect to."""


class UrlNotReachable(_FetchError):
    """The URL is allowed but does not deliver a file: DNS failure, network error, timeout, HTTP error."""


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` learned: where the download should start and what it is called."""

    url: str
    final_url: str
    name: str
    size: int | None


class Download:
    """A streaming response body; :func:`open_download` yields one.

    ``read(n)`` returns at most ``n`` bytes and ``b""`` at the end, so the caller can count bytes and stop at
    its own size cap without ever holding the whole checkpoint (several GB) in memory.
    """

    def __init__(self, url: str, final_url: str, response: urllib3.BaseHTTPResponse) -> None:
        self.url = url
        self.final_url = final_url
        self.size: int | None = _content_length(response)
        self._response = response

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes; network errors and timeouts mid-body become :class:`UrlNotReachable`."""
        if n <= 0:
            # A non-positive size means "everything" for file objects; that would defeat streaming.
            raise ValueError("read() needs a positive size")
        try:
            return self._response.read(n)
        except (Urllib3Error, OSError) as exc:
            raise UrlNotReachable(self.url, f"the download from {self.final_url} broke off") from exc


# --------------------------------------------------------------------------------------------- addresses


@lru_cache(maxsize=64)
def _parse_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse the operator's CIDRs once per distinct tuple; host bits set (``10.2.0.1/16``) are tolerated."""
    return tuple(ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for when a translator or tunnel could deliver it there.

    Python's ``is_global`` calls ``64:ff9b::7f00:1`` (NAT64 of 127.0.0.1) or ``2002:7f00:1::`` (6to4)
    global, so they are judged by what they carry as well.
    """
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64 or addr in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _judge(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, guard: Guard) -> bool:
    """The guard's verdict with ``allow_private`` off: an explicitly allowed network, else public unicast only."""
    if any(addr in network for network in _parse_networks(guard.allowed_networks)):
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # ::ffff:a.b.c.d is the IPv4 host a.b.c.d on a dual-stack socket: judge exactly that.
        return _judge(addr.ipv4_mapped, guard)
    if not addr.is_global or addr.is_multicast:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return _judge(embedded, guard)
    return True


def address_allowed(ip: str, guard: Guard) -> bool:
    """Whether the server may connect to ``ip`` under ``guard``.

    Allowed: anything when ``guard.allow_private``; a global unicast address; an address inside one of
    ``guard.allowed_networks``. IPv4-mapped IPv6 addresses are judged as the IPv4 address they map to.
    Raises ``ValueError`` for a string that is not an IP address.
    """
    if guard.allow_private:
        return True
    return _judge(ipaddress.ip_address(ip), guard)


# ------------------------------------------------------------------------------------------------- hops


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect and what to tell the server."""

    scheme: str
    host: str  # ASCII host name or IP literal, without brackets: SNI and certificate name
    port: int
    host_header: str
    request_target: str  # path and query, safe to put on the request line
    addresses: tuple[str, ...]  # every one of them passed the guard


def _ascii_host(host: str) -> str | None:
    """The host as it goes on the wire (IDNA for non-ASCII names), or None if it cannot be a host name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return host.lower() if _HOSTNAME_RE.match(host) else None


def _request_target(path: str, query: str) -> str:
    """Path and query with whatever http.client would refuse (spaces, non-ASCII) percent-encoded.

    Existing ``%xx`` escapes are kept as they are, so an already encoded URL is sent unchanged.
    """
    target = quote(path or "/", safe="/%:@!$&'()*+,;=~")
    if query:
        target += "?" + quote(query, safe="/?%:@!$&'()*+,;=~")
    return target


def _resolve(host: str, port: int, original_url: str) -> tuple[str, ...]:
    """All addresses ``host`` resolves to, in the resolver's order, without duplicates."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UrlNotReachable(original_url, f"cannot resolve host {host!r}") from exc
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    if not addresses:
        raise UrlNotReachable(original_url, f"host {host!r} has no address")
    return tuple(addresses)


def _check(url: str, guard: Guard, original_url: str) -> _Target:
    """Apply rules 1 and 2 to one hop: scheme, host, and every address the host resolves to."""
    hop = "" if url == original_url else f" (redirect target {url})"
    try:
        parts = urlsplit(url)
        explicit_port = parts.port
    except ValueError as exc:
        raise UrlNotAllowed(original_url, f"not a valid URL{hop}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UrlNotAllowed(original_url, f"only http and https URLs are allowed{hop}")
    if not parts.hostname:
        raise UrlNotAllowed(original_url, f"the URL has no host{hop}")
    host = _ascii_host(parts.hostname)
    if host is None:
        raise UrlNotAllowed(original_url, f"not a valid host name{hop}")
    default_port = _DEFAULT_PORTS[scheme]
    port = explicit_port if explicit_port is not None else default_port

    addresses = _resolve(host, port, original_url)
    for address in addresses:
        if not address_allowed(address, guard):
            # The address itself is left out of the message: it may describe the internal network.
            raise UrlNotAllowed(original_url, f"host {host!r} resolves to an address that is not allowed{hop}")

    host_header = f"[{host}]" if ":" in host else host
    if port != default_port:
        host_header += f":{port}"
    return _Target(
        scheme=scheme,
        host=host,
        port=port,
        host_header=host_header,
        request_target=_request_target(parts.path, parts.query),
        addresses=addresses,
    )


class _Deadline:
    """The end of a whole exchange (connect, send, read the answer), enforced whatever the exchange is waiting for.

    Socket timeouts bound each wait, not their sum: a server that trickles one byte per second never lets a
    ``recv`` time out, and would hold the caller for as long as it likes. At the deadline a timer shuts down every
    socket the exchange opened, which ends a blocked ``recv`` or ``send`` at once (TLS included: the shutdown
    goes to the descriptor under the TLS layer); :attr:`expired` then says why the request broke off.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends_at = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left, never below a millisecond (a zero timeout would mean non-blocking to a socket)."""
        return max(0.001, self.ends_at - time.monotonic())

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self.ends_at

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (at once when it has already passed)."""
        with self._lock:
            self._sockets.append(sock)
            late = self.expired
        if late:
            _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    """Shut the descriptor down under any TLS wrapper (``SSLSocket.shutdown`` would also drop its TLS state while
    the other thread is still reading through it)."""
    with suppress(OSError):  # already closed or never connected: nothing to end
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _watched(base: type[HTTPConnection], deadline: _Deadline) -> type[HTTPConnection]:
    """``base`` whose freshly connected TCP socket (before any TLS handshake) is put under ``deadline``."""

    class Watched(base):  # type: ignore[misc, valid-type]
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            deadline.watch(sock)
            return sock

    return Watched


def _pool(target: _Target, address: str, guard: Guard, deadline: _Deadline | None = None) -> urllib3.HTTPConnectionPool:
    """A one-connection pool pinned to ``address``; the name is only used for SNI and certificate checks.

    With a ``deadline`` no single wait may outlast what is left of it (``total``) and its timer watches the socket.
    """
    if deadline is None:
        timeout = urllib3.Timeout(connect=guard.timeout, read=guard.timeout)
    else:
        left = deadline.remaining()
        timeout = urllib3.Timeout(connect=left, read=left, total=left)
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            host=address,
            port=target.port,
            timeout=timeout,
            retries=False,
            maxsize=1,
            cert_reqs="CERT_REQUIRED",
            server_hostname=target.host,
            assert_hostname=target.host,
        )
        connection: type[HTTPConnection] = HTTPSConnection
    else:
        pool = urllib3.HTTPConnectionPool(host=address, port=target.port, timeout=timeout, retries=False, maxsize=1)
        connection = HTTPConnection
    if deadline is not None:
        pool.ConnectionCls = _watched(connection, deadline)
    return pool


@dataclass
class _Exchange:
    """A response whose body has not been read, with the pool that owns its connection."""

    response: urllib3.BaseHTTPResponse
    pool: urllib3.HTTPConnectionPool
    url: str

    def close(self) -> None:
        """Drop the connection without reading the body: a redirect's or an error's body is of no use,
        and a 307 from a download endpoint may well be followed by gigabytes."""
        self.response.close()
        self.pool.close()


def _send(
    method: str,
    url: str,
    guard: Guard,
    original_url: str,
    *,
    body: bytes | None = None,
    extra_headers: dict[str, str] | None = None,
    deadline: _Deadline | None = None,
) -> _Exchange:
    """One request, no redirects followed, connected only to addresses that passed the guard.

    If connecting to the first address fails, the next checked address is tried (a host with a dead IPv6
    address next to a working IPv4 one is common); once a request is on the wire nothing is retried.
    """
    target = _check(url, guard, original_url)
    headers = {
        "User-Agent": _USER_AGENT,
        "Accept": "*/*",
        "Accept-Encoding": "identity",
        **(extra_headers or {}),
        "Host": target.host_header,
    }
    last_error: Exception | None = None
    for address in target.addresses:
        if deadline is not None and deadline.passed():
            break
        pool = _pool(target, address, guard, deadline)
        try:
            response = pool.urlopen(
                method,
                target.request_target,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
        except ConnectTimeoutError as exc:  # includes NewConnectionError (refused, unreachable)
            pool.close()
            last_error = exc
            continue
        except (Urllib3Error, OSError) as exc:
            pool.close()
            raise UrlNotReachable(original_url, f"request to {url} failed: {type(exc).__name__}") from exc
        return _Exchange(response=response, pool=pool, url=url)
    raise UrlNotReachable(original_url, f"cannot connect to {url}") from last_error


def _location(exchange: _Exchange) -> str | None:
    """The absolute redirect target of a response, or None when it does not carry one."""
    location = exchange.response.headers.get("Location")
    if not location or not location.strip():
        return None
    return urljoin(exchange.url, _header_text(location.strip()))


def _follow(method: str, url: str, guard: Guard, *, head_fallback: bool = False) -> _Exchange:
    """Request ``url``, following at most MAX_REDIRECTS redirects, each hop checked and pinned anew.

    Returns the final 2xx exchange with its body unread; the caller must close it. With ``head_fallback``
    a HEAD refused as unsupported is repeated as GET (whose body is then never read).
    """
    current = url
    redirects = 0
    while True:
        exchange = _send(method, current, guard, url)
        status = exchange.response.status
        if head_fallback and method == "HEAD" and status in _HEAD_REFUSED_STATUSES:
            exchange.close()
            method = "GET"
            continue
        if status in REDIRECT_STATUSES:
            location = _location(exchange)
            exchange.close()
            if location is None:
                raise UrlNotReachable(url, f"HTTP {status} from {current} without a Location")
            redirects += 1
            if redirects > MAX_REDIRECTS:
                raise UrlNotReachable(url, f"more than {MAX_REDIRECTS} redirects")
            current = location
            continue
        if not 200 <= status < 300:
            exchange.close()
            raise UrlNotReachable(url, f"HTTP {status} from {current}")
        return exchange


# ------------------------------------------------------------------------------------------------- names


def _header_text(value: str) -> str:
    """Undo http.client's latin-1 reading of a header that was really sent as UTF-8 bytes (as browsers do)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _unquote_header_string(raw: str) -> str:
    """The value of a header parameter: a quoted string loses its quotes and backslash escapes."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def _decode_ext_value(raw: str) -> str | None:
    """An RFC 5987 ``charset'language'percent-encoded`` value, or None when it is malformed."""
    parts = _unquote_header_string(raw).split("'", 2)
    if len(parts) != 3:
        return None
    charset, _language, encoded = parts
    try:
        return unquote(encoded, encoding=charset.strip() or "utf-8", errors="strict")
    except (LookupError, UnicodeDecodeError):
        return None


def filename_from_disposition(value: str | None) -> str | None:
    """The file name a ``Content-Disposition`` header names, or None.

    ``filename*=`` (RFC 5987/6266, percent-encoded with a charset) wins over ``filename=``, as RFC 6266 asks;
    the plain form may be quoted or a bare token. An empty name counts as none.
    """
    if not value:
        return None
    plain: str | None = None
    extended: str | None = None
    # The leading ";" lets the parameter pattern also find a malformed header that has no disposition type.
    for match in _HEADER_PARAM_RE.finditer(";" + value):
        key = match.group(1).lower()
        if key == "filename*":
            extended = _decode_ext_value(match.group(2)) or extended
        elif key == "filename":
            plain = _header_text(_unquote_header_string(match.group(2))) or plain
    return extended or plain or None


def _name_from_url(url: str) -> str:
    """The last path segment of ``url``, percent-decoded; the query and fragment play no part."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def _content_length(response: urllib3.BaseHTTPResponse) -> int | None:
    value = (response.headers.get("Content-Length") or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


# ------------------------------------------------------------------------------------------------ public


def _probe_civitai(url: str, guard: Guard) -> Probe:
    """Civitai's download endpoint answers a GET with a redirect to signed storage: the redirect already
    says what the file is called, so it is not followed (and the body of the answer is never read)."""
    exchange = _send("GET", url, guard, url)
    try:
        status = exchange.response.status
        disposition = filename_from_disposition(exchange.response.headers.get("Content-Disposition"))
        if status in REDIRECT_STATUSES:
            location = _location(exchange)
            if location is None:
                raise UrlNotReachable(url, f"HTTP {status} without a Location")
            # The 307's own Content-Length measures the redirect page, not the file: size unknown.
            return Probe(url=url, final_url=location, name=disposition or _name_from_url(location), size=None)
        if not 200 <= status < 300:
            raise UrlNotReachable(url, f"HTTP {status}")
        size = _content_length(exchange.response)
        return Probe(url=url, final_url=url, name=disposition or _name_from_url(url), size=size)
    finally:
        exchange.close()


def probe(url: str, guard: Guard) -> Probe:
    """Find out, without downloading it, what file ``url`` delivers: its name, size and final location.

    Registration needs the name (to judge the extension) and the size (to enforce a cap) before it commits
    to a multi-gigabyte download. Raises :class:`UrlNotAllowed` when the URL or any redirect hop is refused
    by ``guard`` and :class:`UrlNotReachable` for everything that goes wrong on the network.
    """
    try:
        path = urlsplit(url).path
    except ValueError as exc:
        raise UrlNotAllowed(url, "not a valid URL") from exc
    if _CIVITAI_MARKER in path:
        return _probe_civitai(url, guard)
    exchange = _follow("HEAD", url, guard, head_fallback=True)
    try:
        disposition = filename_from_disposition(exchange.response.headers.get("Content-Disposition"))
        return Probe(
            url=url,
            final_url=exchange.url,
            name=disposition or _name_from_url(exchange.url),
            size=_content_length(exchange.response),
        )
    finally:
        exchange.close()


@contextmanager
def open_download(url: str, guard: Guard) -> Iterator[Download]:
    """GET ``url`` (redirects followed, every hop guarded and pinned) and yield its body as a stream.

    The connection is closed on exit whether or not the body was read to the end, so abandoning a download
    (size cap hit, hash mismatch) does not leave a socket draining gigabytes.
    """
    exchange = _follow("GET", url, guard)
    try:
        yield Download(url=url, final_url=exchange.url, response=exchange.response)
    finally:
        exchange.close()


# ------------------------------------------------------------------------------------------- other callers
# Webhooks (apps.accounts.webhooks) call URLs that users give, which is the same SSRF hole as downloads by URL:
# they get the same checks and the same pinning.


@dataclass(frozen=True)
class Reply:
    """A POST's answer: its status and at most the first ``max_reply_bytes`` of its body."""

    status: int
    body: bytes


def check_url(url: str, guard: Guard) -> None:
    """Judge ``url`` as a request would (scheme, host, every address it resolves to) without sending anything.

    Raises :class:`UrlNotAllowed` or, when the host does not resolve, :class:`UrlNotReachable`.
    """
    _check(url, guard, url)


def post(
    url: str, body: bytes, guard: Guard, headers: dict[str, str] | None = None, *, max_reply_bytes: int = 1024
) -> Reply:
    """POST ``body`` to ``url`` once, guarded and pinned exactly as downloads are, all within ``guard.timeout``.

    ``guard.timeout`` bounds the whole exchange, not each wait: connecting, sending, the status line and headers,
    and reading at most ``max_reply_bytes`` of the body (0: none; the status is the answer). A receiver that
    trickles its answer is cut off at the deadline with :class:`UrlNotReachable`, so a caller's worker is never
    held longer. (Resolving the name comes before and is bounded by the system resolver's own timeout.)

    Redirects are not followed: a 3xx comes back as the reply. Following it would send the body to a place the
    caller never checked with its owner, and a webhook receiver is expected to answer for itself.
    """
    deadline = _Deadline(guard.timeout)
    try:
        try:
            exchange = _send("POST", url, guard, url, body=body, extra_headers=headers, deadline=deadline)
        except UrlNotReachable as exc:
            if deadline.passed():
                raise UrlNotReachable(url, _too_slow(url, guard)) from exc
            raise
        try:
            if deadline.expired:
                # The timer cut the head short, which http.client takes for its end: nothing here can be trusted.
                raise TimeoutError("deadline passed while reading the answer's head")
            return Reply(status=exchange.response.status, body=_read_some(exchange.response, max_reply_bytes, deadline))
        except (Urllib3Error, OSError) as exc:
            reason = _too_slow(url, guard) if deadline.passed() else f"the answer from {url} broke off"
            raise UrlNotReachable(url, reason) from exc
        finally:
            exchange.close()
    finally:
        deadline.cancel()


def _too_slow(url: str, guard: Guard) -> str:
    return f"no complete answer from {url} within {guard.timeout:g} s"


def _read_some(response: urllib3.BaseHTTPResponse, limit: int, deadline: _Deadline) -> bytes:
    """Up to ``limit`` bytes of the body, read as they come (``read1``), stopping at the deadline."""
    data = b""
    while len(data) < limit:
        if deadline.passed():
            raise TimeoutError("deadline passed while reading the answer")
        chunk = response.read1(limit - len(data))
        if not chunk:
            break
        data += chunk
    if deadline.expired:  # the timer's shutdown looks like the end of the body
        raise TimeoutError("deadline passed while reading the answer")
    return data
