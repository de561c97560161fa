"""frontdoor/cimd.py against real HTTP and HTTPS servers on loopback (aiohttp), with the SSRF fence of DESIGN §8.

Names the tests need (`cimd.test`, `internal.test`, …) are answered by a resolver the tests inject, so nothing asks
real DNS. And nothing may ever connect anywhere but loopback: a Python audit hook (PEP 578) watches every
`socket.connect` and `socket.getaddrinfo` of this process while a test of this module runs, records them, and makes
any connection to a non-loopback address (or a lookup of a name other than localhost) fail on the spot. So a refusal
that came too late would fail its test as a connection error, and the address tests also assert that nothing was
looked up or connected at all: the refusal came first.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import ipaddress
import json
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from okta_agent_proxy.frontdoor.addresses import address_allowed, check_client_id_url, checking_socket_factory
from okta_agent_proxy.frontdoor.cimd import (
    FETCH_TIMEOUT_SECONDS,
    MAX_DOCUMENT_BYTES,
    CimdReason,
    CimdRefused,
    ClientMetadata,
    ClientMetadataFetcher,
    is_client_id_url,
)

# The network guard


@dataclass
class _NetworkLog:
    active: bool = False
    connects: list[str] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)


NETWORK = _NetworkLog()
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not NETWORK.active:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):
        host = str(args[1][0])
        NETWORK.connects.append(host)
        if not _is_loopback(host):
            raise RuntimeError(f"test tried to connect to {host}")
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        NETWORK.lookups.append(host)
        if host not in _LOCAL_NAMES:
            raise RuntimeError(f"test tried to look up {host}")


sys.addaudithook(_audit)  # process-wide and permanent (PEP 578), so it acts only while `active`


@pytest.fixture(autouse=True)
def network_guard() -> Iterator[_NetworkLog]:
    NETWORK.connects.clear()
    NETWORK.lookups.clear()
    NETWORK.active = True
    try:
        yield NETWORK
    finally:
        NETWORK.active = False
    assert all(_is_loopback(host) for host in NETWORK.connects)


# A resolver the tests control: names → addresses, and nothing else


class StaticResolver(AbstractResolver):
    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.names:
            raise OSError(f"{host}: no such name in the test resolver")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
            for address in self.names[host]
        ]

    async def close(self) -> None:
        pass


# An https certificate for cimd.test (and localhost), and a context that trusts it


@dataclass(frozen=True)
class TlsCertificate:
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_file))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cimd.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("cimd.test"), x509.DNSName("localhost")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("cimd-tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsCertificate(cert_file, key_file)


# The document server


@dataclass
class Reply:
    document: dict[str, Any] | None = None
    body: bytes | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0  # before the headers
    trickle: float = 0.0  # between body bytes
    stall_after: int | None = None  # send this many body bytes, then wait (chunked, no Content-Length)


@dataclass
class Hit:
    path: str
    host: str | None


class DocumentServer:
    """Serves `replies[path]` over http (127.0.0.1) and https (127.0.0.1, certificate for cimd.test)."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.hits: list[Hit] = []
        self.server_names: list[str | None] = []  # TLS SNI as the https listener saw it
        self.release = asyncio.Event()
        self.http_port = 0
        self.https_port = 0

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def https(self, path: str, host: str = "cimd.test") -> str:
        return f"https://{host}:{self.https_port}{path}"

    def paths_hit(self) -> list[str]:
        return [hit.path for hit in self.hits]

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), seconds)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(Hit(request.path, request.headers.get("Host")))
        reply = self.replies.get(request.path)
        if reply is None:
            return web.Response(status=404, text="no such document")
        if reply.delay:
            await self._pause(reply.delay)
        body = reply.body if reply.body is not None else json.dumps(reply.document).encode()
        if not reply.trickle and reply.stall_after is None:
            return web.Response(status=reply.status, body=body, headers=reply.headers)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        if reply.stall_after is not None:
            await response.write(body[: reply.stall_after])
            await self._pause(10)
            return response
        for index in range(len(body)):
            if self.release.is_set():
                break
            await response.write(body[index : index + 1])
            await self._pause(reply.trickle)
        return response


@pytest.fixture
async def server(certificate: TlsCertificate) -> AsyncIterator[DocumentServer]:
    documents = DocumentServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", documents.handle)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate.cert_file, certificate.key_file)

    def record_server_name(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        documents.server_names.append(name)

    tls.sni_callback = record_server_name
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    secure = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await plain.start()
    await secure.start()
    documents.http_port = _port(plain)
    documents.https_port = _port(secure)
    try:
        yield documents
    finally:
        documents.release.set()
        await runner.cleanup()


def _port(site: web.TCPSite) -> int:
    server = site._server
    assert isinstance(server, asyncio.Server)
    port: int = server.sockets[0].getsockname()[1]
    return port


def document(client_id: str, **extra: Any) -> dict[str, Any]:
    return {"client_id": client_id, "client_name": "Test Client", "redirect_uris": ["http://127.0.0.1/cb"]} | extra


def padded(client_id: str, size: int) -> bytes:
    """A valid document of exactly `size` bytes."""
    base = json.dumps(document(client_id, padding="")).encode()
    body = json.dumps(document(client_id, padding="x" * (size - len(base)))).encode()
    assert len(body) == size
    return body


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000_000.0

    def __call__(self) -> float:
        return self.now


RESOLVER_NAMES = {
    "cimd.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],  # not on the certificate
    "internal.test": ["10.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "mixed.test": ["127.0.0.1", "10.0.0.1"],
    "v6loop.test": ["::1"],
}


def fetcher(certificate: TlsCertificate | None = None, **options: Any) -> ClientMetadataFetcher:
    options.setdefault("allow_loopback", True)
    options.setdefault("resolver", StaticResolver(RESOLVER_NAMES))
    if certificate is not None:
        options.setdefault("ssl_context", certificate.client_context())
    return ClientMetadataFetcher(**options)


async def refusal(fetch: ClientMetadataFetcher, client_id: str) -> CimdRefused:
    with pytest.raises(CimdRefused) as refused:
        await fetch.fetch(client_id)
    return refused.value


# Good documents


async def test_good_document_on_loopback_http(server: DocumentServer) -> None:
    client_id = server.http("/client.json")
    server.replies["/client.json"] = Reply(document(client_id, redirect_uris=["http://127.0.0.1/cb", "x:/y"]))
    clock = Clock()
    metadata = await fetcher(clock=clock).get(client_id)
    assert metadata == ClientMetadata(
        client_id, ("http://127.0.0.1/cb", "x:/y"), "Test Client", clock.now, clock.now + 300
    )
    assert metadata.host == "127.0.0.1"


async def test_good_document_over_https_goes_to_the_checked_address_with_the_name(
    server: DocumentServer, certificate: TlsCertificate
) -> None:
    """The resolver's answer is the address connected to; TLS SNI, the certificate check and Host use the name."""
    client_id = server.https("/oauth/client")
    server.replies["/oauth/client"] = Reply(document(client_id, client_name=None))
    resolver = StaticResolver(RESOLVER_NAMES)
    metadata = await fetcher(certificate, resolver=resolver).fetch(client_id)
    assert (metadata.client_id, metadata.client_name, metadata.host) == (client_id, None, "cimd.test")
    assert resolver.asked == ["cimd.test"]  # looked up once
    assert server.server_names == ["cimd.test"]
    assert server.hits == [Hit("/oauth/client", f"cimd.test:{server.https_port}")]
    assert NETWORK.connects == ["127.0.0.1"]
    assert NETWORK.lookups == []  # the injected resolver, never the system's


async def test_certificates_are_verified(server: DocumentServer, certificate: TlsCertificate) -> None:
    server.replies["/c"] = Reply(document(server.https("/c")))
    # The system's trust store does not know the test certificate.
    assert (await refusal(fetcher(), server.https("/c"))).reason is CimdReason.FETCH_FAILED
    # Trusted, but not for this name: the check is against the name, though the address is the same.
    server.replies["/d"] = Reply(document(server.https("/d", "other.test")))
    refused = await refusal(fetcher(certificate), server.https("/d", "other.test"))
    assert refused.reason is CimdReason.FETCH_FAILED
    assert server.paths_hit() == []


async def test_content_type_variants(server: DocumentServer) -> None:
    for path, content_type in [("/a", "application/json; charset=utf-8"), ("/b", "application/vnd.client+json")]:
        server.replies[path] = Reply(document(server.http(path)), headers={"Content-Type": content_type})
        assert (await fetcher().fetch(server.http(path))).client_id == server.http(path)


async def test_document_of_exactly_the_limit_is_read(server: DocumentServer) -> None:
    client_id = server.http("/limit")
    server.replies["/limit"] = Reply(body=padded(client_id, MAX_DOCUMENT_BYTES))
    assert (await fetcher().fetch(client_id)).client_id == client_id


# Refusals of the response


async def test_redirect_is_refused_and_not_followed(server: DocumentServer) -> None:
    target = server.http("/moved")
    server.replies["/moved"] = Reply(document(target))
    for status in (301, 302, 303, 307, 308):
        path = f"/r{status}"
        server.replies[path] = Reply(status=status, body=b"", headers={"Location": target})
        refused = await refusal(fetcher(), server.http(path))
        assert refused.reason is CimdReason.REDIRECT
        assert str(status) in refused.detail
    assert "/moved" not in server.paths_hit()


async def test_six_kilobyte_document_is_refused(server: DocumentServer) -> None:
    client_id = server.http("/big")
    server.replies["/big"] = Reply(body=padded(client_id, 6 * 1024))
    assert (await refusal(fetcher(), client_id)).reason is CimdReason.TOO_LARGE
    one_over = server.http("/over")
    server.replies["/over"] = Reply(body=padded(one_over, MAX_DOCUMENT_BYTES + 1))
    assert (await refusal(fetcher(), one_over)).reason is CimdReason.TOO_LARGE


async def test_reading_stops_at_the_limit(server: DocumentServer) -> None:
    """Chunked, no Content-Length: 6 KB arrive and the server then holds the connection open. A reader that wanted
    the whole body would wait for the timeout; this one stops as soon as it has more than 5 KB."""
    client_id = server.http("/endless")
    server.replies["/endless"] = Reply(body=padded(client_id, 64 * 1024), stall_after=6 * 1024)
    started = time.monotonic()
    refused = await refusal(fetcher(timeout=3.0), client_id)
    assert refused.reason is CimdReason.TOO_LARGE
    assert time.monotonic() - started < 2.0


async def test_document_whose_client_id_differs(server: DocumentServer) -> None:
    url = server.http("/who")
    for claimed in (
        "https://attacker.example/SECRET-MARKER",
        url + "/",
        url.replace("127.0.0.1", "localhost"),
        url.replace("http://", "HTTP://"),
        url + "?x",
        None,
    ):
        server.replies["/who"] = Reply(document(url) | {"client_id": claimed})
        refused = await refusal(fetcher(), url)
        assert refused.reason is CimdReason.CLIENT_ID_MISMATCH
        assert "SECRET-MARKER" not in str(refused)


async def test_slow_server_is_cut_off(server: DocumentServer) -> None:
    client_id = server.http("/slow")
    server.replies["/slow"] = Reply(document(client_id), delay=30)
    started = time.monotonic()
    refused = await refusal(fetcher(timeout=0.3), client_id)
    assert refused.reason is CimdReason.TIMEOUT
    assert time.monotonic() - started < 2.0
    assert FETCH_TIMEOUT_SECONDS == 5.0  # the default the front door runs with (DESIGN §8)


async def test_trickling_body_is_cut_off(server: DocumentServer) -> None:
    """Headers at once, then a byte every 50 ms: each read makes progress, only the total deadline ends it."""
    client_id = server.http("/trickle")
    server.replies["/trickle"] = Reply(document(client_id), trickle=0.05)
    started = time.monotonic()
    refused = await refusal(fetcher(timeout=0.5), client_id)
    assert refused.reason is CimdReason.TIMEOUT
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html>not json</html>", "application/json"),
        (b"", "application/json"),
        (b'["a list"]', "application/json"),
        (b'"a string"', "application/json"),
        (b"[" * 2500 + b"]" * 2500, "application/json"),  # deeper than the JSON parser's recursion limit
        (b'{"client_id": "x", "client_id": "y"}', "application/json"),  # duplicate names
        (b'{"n": NaN}', "application/json"),
        (b"\xef\xbb\xbf{}", "application/json"),  # a byte order mark
        (b"\xff\xfe{\x00}\x00", "application/json"),  # UTF-16
        (b"{}", "text/html"),
        (b"{}", "text/plain"),
        (b"{}", "application/jsonx"),
        (b"{}", "application/json; charset=iso-8859-1"),
        (b"{}", ""),
    ],
)
async def test_non_json_body_is_refused(server: DocumentServer, body: bytes, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    server.replies["/bad"] = Reply(body=body, headers=headers)
    refused = await refusal(fetcher(), server.http("/bad"))
    assert refused.reason is CimdReason.NOT_JSON


async def test_content_coding_is_refused(server: DocumentServer) -> None:
    client_id = server.http("/gz")
    packed = gzip.compress(json.dumps(document(client_id)).encode())
    server.replies["/gz"] = Reply(body=packed, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert (await refusal(fetcher(), client_id)).reason is CimdReason.NOT_JSON


@pytest.mark.parametrize("status", [404, 500, 204, 201])
async def test_other_statuses_are_refused(server: DocumentServer, status: int) -> None:
    client_id = server.http("/s")
    server.replies["/s"] = Reply(document(client_id), status=status)
    refused = await refusal(fetcher(), client_id)
    assert refused.reason is CimdReason.BAD_STATUS
    assert refused.detail == f"HTTP {status}"


@pytest.mark.parametrize(
    "change",
    [
        {"redirect_uris": None},
        {"redirect_uris": []},
        {"redirect_uris": "http://127.0.0.1/cb"},
        {"redirect_uris": [1]},
        {"redirect_uris": [""]},
        {"client_name": 5},
        {"client_name": ["x"]},
        {"token_endpoint_auth_method": "client_secret_basic"},
        {"token_endpoint_auth_method": "private_key_jwt"},
        {"client_secret": "s3cret"},
        {"client_secret_expires_at": 0},
    ],
)
async def test_invalid_metadata(server: DocumentServer, change: dict[str, Any]) -> None:
    client_id = server.http("/meta")
    content = {key: value for key, value in (document(client_id) | change).items() if value is not None}
    server.replies["/meta"] = Reply(content)
    refused = await refusal(fetcher(), client_id)
    assert refused.reason is CimdReason.INVALID_METADATA
    assert "s3cret" not in str(refused)


async def test_public_client_declaration_is_accepted(server: DocumentServer) -> None:
    client_id = server.http("/public")
    server.replies["/public"] = Reply(document(client_id, token_endpoint_auth_method="none", grant_types=["x"]))
    assert (await fetcher().fetch(client_id)).redirect_uris == ("http://127.0.0.1/cb",)


async def test_closed_port_fails_cleanly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = await refusal(fetcher(), f"http://127.0.0.1:{port}/gone")
    assert refused.reason is CimdReason.FETCH_FAILED


# Addresses: refused before any lookup or connection


@pytest.mark.parametrize(
    "client_id",
    [
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/client",
        "https://127.0.0.1/client",
        "https://[::1]/client",
        "https://[::ffff:10.0.0.1]/client",
        "https://[::ffff:127.0.0.1]/client",
        "https://[::ffff:169.254.169.254]/client",
        "https://[64:ff9b::a00:1]/client",  # NAT64 form of 10.0.0.1
        "https://[fe80::1]/client",
        "https://[fd00::1]/client",
        "https://0.0.0.0/client",
        "https://[::]/client",
        "https://192.168.1.1/client",
        "https://100.64.0.1/client",
        "https://224.0.0.1/client",
    ],
)
async def test_forbidden_literal_addresses(client_id: str) -> None:
    refused = await refusal(fetcher(allow_loopback=False), client_id)
    assert refused.reason is CimdReason.FORBIDDEN_ADDRESS
    assert refused.detail.startswith("the URL names ")  # refused from the URL alone
    assert NETWORK.connects == [] and NETWORK.lookups == []


@pytest.mark.parametrize(
    "client_id",
    [
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/client",
        "https://[::ffff:10.0.0.1]/client",
        "https://[fe80::1]/client",
    ],
)
async def test_loopback_permission_admits_nothing_else(client_id: str) -> None:
    refused = await refusal(fetcher(allow_loopback=True), client_id)
    assert refused.reason is CimdReason.FORBIDDEN_ADDRESS
    assert refused.detail.startswith("the URL names ")
    assert NETWORK.connects == []


@pytest.mark.parametrize(
    ("name", "allow_loopback"),
    [
        ("internal.test", True),  # → 10.0.0.1
        ("metadata.test", True),  # → 169.254.169.254
        ("mapped.test", True),  # → ::ffff:10.0.0.1
        ("mixed.test", True),  # → 127.0.0.1 and 10.0.0.1: one bad address refuses the name
        ("cimd.test", False),  # → 127.0.0.1
        ("v6loop.test", False),  # → ::1
    ],
)
async def test_names_are_judged_by_what_they_resolve_to(
    server: DocumentServer, certificate: TlsCertificate, name: str, allow_loopback: bool
) -> None:
    resolver = StaticResolver(RESOLVER_NAMES)
    client_id = server.https("/client", name)
    server.replies["/client"] = Reply(document(client_id))
    refused = await refusal(fetcher(certificate, resolver=resolver, allow_loopback=allow_loopback), client_id)
    assert refused.reason is CimdReason.FORBIDDEN_ADDRESS
    assert refused.detail.startswith(f"{name} resolves to ")  # the resolver refused, before any socket
    assert resolver.asked == [name]
    assert NETWORK.connects == []
    assert server.hits == []


async def test_localhost_through_the_system_resolver_is_loopback(server: DocumentServer) -> None:
    client_id = f"https://localhost:{server.https_port}/client"
    refused = await refusal(ClientMetadataFetcher(), client_id)
    assert refused.reason is CimdReason.FORBIDDEN_ADDRESS
    assert NETWORK.lookups == ["localhost"]
    assert NETWORK.connects == []


async def test_plain_http_must_stay_on_loopback(server: DocumentServer) -> None:
    """With loopback allowed, http://localhost is accepted only if localhost really is loopback."""
    client_id = f"http://localhost:{server.http_port}/client"
    server.replies["/client"] = Reply(document(client_id))
    assert (await fetcher(resolver=StaticResolver({"localhost": ["127.0.0.1"]})).fetch(client_id)).host == "localhost"
    hijacked = StaticResolver({"localhost": ["93.184.215.14"]})
    assert (await refusal(fetcher(resolver=hijacked), client_id)).reason is CimdReason.FORBIDDEN_ADDRESS
    assert NETWORK.connects == ["127.0.0.1"]


async def test_the_socket_check_holds_where_the_resolver_is_skipped() -> None:
    """aiohttp does not resolve IP literals; the socket factory still refuses to connect to a refused address."""
    connector = aiohttp.TCPConnector(socket_factory=checking_socket_factory(allow_loopback=True), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as failed:
            await session.get("http://10.0.0.1:9/", timeout=aiohttp.ClientTimeout(total=2))
    assert str(failed.value.os_error) == "refused to connect to 10.0.0.1: not a public address"
    assert NETWORK.connects == []


def test_socket_factory_decisions() -> None:
    ipv4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))
    public = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 443))
    with checking_socket_factory(allow_loopback=True)(ipv4):
        pass
    for factory, addr_info in [
        (checking_socket_factory(allow_loopback=False), ipv4),
        (checking_socket_factory(allow_loopback=True, loopback_only=True), public),
        (checking_socket_factory(allow_loopback=True), (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 1))),
    ]:
        with pytest.raises(OSError, match=r"^refused to connect to .*: not a public address$"):
            factory(addr_info)


@pytest.mark.parametrize(
    ("address", "allowed", "allowed_with_loopback"),
    [
        ("8.8.8.8", True, True),
        ("2606:4700:4700::1111", True, True),
        ("::ffff:8.8.8.8", True, True),
        ("64:ff9b::808:808", True, True),  # NAT64 form of a public address (IPv6-only networks with DNS64)
        ("127.0.0.1", False, True),
        ("127.255.0.9", False, True),
        ("::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("10.0.0.1", False, False),
        ("172.16.5.4", False, False),
        ("192.168.0.1", False, False),
        ("169.254.169.254", False, False),
        ("100.64.0.1", False, False),
        ("0.0.0.0", False, False),
        ("255.255.255.255", False, False),
        ("224.0.0.251", False, False),
        ("192.0.0.9", False, False),
        ("192.0.2.1", False, False),
        ("198.18.0.1", False, False),
        ("240.0.0.1", False, False),
        ("::", False, False),
        ("::ffff:10.0.0.1", False, False),
        ("::ffff:169.254.169.254", False, False),
        ("64:ff9b::a00:1", False, False),
        ("64:ff9b:1::1", False, False),
        ("::a00:1", False, False),  # IPv4-compatible (deprecated) 10.0.0.1
        ("2002:a00:1::1", False, False),  # 6to4 of 10.0.0.1
        ("2001:0:a00:1::1", False, False),  # Teredo
        ("2001:db8::1", False, False),
        ("fc00::1", False, False),
        ("fd12:3456::1", False, False),
        ("fe80::1", False, False),
        ("fec0::1", False, False),
        ("ff02::1", False, False),
        ("ff0e::1", False, False),
        ("fe80::1%eth0", False, False),
    ],
)
def test_address_policy(address: str, allowed: bool, allowed_with_loopback: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert address_allowed(ip) is allowed
    assert address_allowed(ip, allow_loopback=True) is allowed_with_loopback


# The URL itself


@pytest.mark.parametrize(
    "client_id",
    [
        "http://cimd.test/client",  # https only
        "http://127.0.0.1/client",  # plain http to loopback only when loopback is allowed
        "HTTPS://cimd.test/client",
        "ftp://cimd.test/client",
        "//cimd.test/client",
        "cimd.test/client",
        "https://cimd.test",  # no path
        "https://cimd.test#frag",
        "https://cimd.test/client#frag",
        "https://cimd.test/client#",
        "https://cimd.test/client?x=1",
        "https://cimd.test/client?",
        "https://user@cimd.test/client",
        "https://user:pw@cimd.test/client",
        "https://cimd.test/a/../client",
        "https://cimd.test/./client",
        "https://cimd.test/%2e%2E/client",
        "https://cimd.test/client/..",
        "https://cimd.test\\client",
        "https://cimd.test/cli ent",
        "https://cimd.test/cli\u00e9nt",
        "https://cimd.test/%zz",
        "https://2130706433/client",  # 127.0.0.1 to a resolver
        "https://127.1/client",
        "https://0x7f.1/client",
        "https://0177.0.0.1/client",
        "https://127.000.000.001/client",
        "https://cimd.test./client",
        "https://cimd..test/client",
        "https://-cimd.test/client",
        "https://cimd.test:0/client",
        "https://cimd.test:65536/client",
        "https://cimd.test:/client",
        "https://cimd.test:443x/client",
        "https://[::1/client",
        "https://[fe80::1%25eth0]/client",
        "https://[zz::1]/client",
        "https:///client",
        "https://cimd.test/" + "a" * 2048,
    ],
)
async def test_invalid_client_id_urls(client_id: str) -> None:
    with pytest.raises(CimdRefused) as refused:
        check_client_id_url(client_id)
    assert refused.value.reason is CimdReason.INVALID_URL
    again = await refusal(fetcher(allow_loopback=False), client_id)
    assert again.reason is CimdReason.INVALID_URL
    assert NETWORK.connects == [] and NETWORK.lookups == []


@pytest.mark.parametrize(
    "client_id",
    [
        "https://claude.ai/oauth/claude-code-client-metadata",
        "https://vscode.dev/oauth/client-metadata.json",
        "https://cimd.test:8443/client",  # CIMD §3: MAY contain a port
        "https://cimd.test/",  # NOT RECOMMENDED, not forbidden
        "https://a_b.cimd.test/c%20d/~e",
        "https://8.8.8.8/client",
        "https://[2606:4700:4700::1111]/client",
    ],
)
def test_valid_client_id_urls(client_id: str) -> None:
    check_client_id_url(client_id)


def test_loopback_permission_admits_plain_http_to_loopback_hosts_only() -> None:
    for client_id in ("http://127.0.0.1:8/c", "http://[::1]:8/c", "http://localhost:8/c", "https://127.0.0.1/c"):
        check_client_id_url(client_id, allow_loopback=True)
    for client_id in ("http://cimd.test/c", "http://8.8.8.8/c", "http://localhost.cimd.test/c"):
        with pytest.raises(CimdRefused) as refused:
            check_client_id_url(client_id, allow_loopback=True)
        assert refused.value.reason is CimdReason.INVALID_URL


def test_client_id_url_detection() -> None:
    assert is_client_id_url("https://claude.ai/oauth/claude-code-client-metadata")
    assert is_client_id_url("http://127.0.0.1:9/c")
    assert not is_client_id_url("fdc_5d1b0b1e6c")
    assert not is_client_id_url("httpsx://a/b")


# Caching


async def test_cache_lifetime_follows_max_age_within_bounds(server: DocumentServer) -> None:
    cases = {
        "/m600": ({"Cache-Control": "max-age=600"}, 600),
        "/m10": ({"Cache-Control": "public, max-age=10"}, 300),
        "/mbig": ({"Cache-Control": "max-age=9999999"}, 86400),
        "/none": ({}, 300),
        "/nostore": ({"Cache-Control": "no-store"}, 300),
        "/aged": ({"Cache-Control": "max-age=1000", "Age": "400"}, 600),
        "/twice": ({"Cache-Control": "max-age=5000, max-age=700"}, 700),
        "/junk": ({"Cache-Control": "max-age=soon"}, 300),
        "/huge": ({"Cache-Control": "max-age=" + "9" * 5000}, 300),  # more digits than int() takes
        "/super": ({"Cache-Control": "max-age=\u00b2"}, 300),  # "²".isdigit() is True; int("²") fails
        "/badage": ({"Cache-Control": "max-age=900", "Age": "\u00b2"}, 900),
    }
    clock = Clock()
    fetch = fetcher(clock=clock)
    for path, (headers, lifetime) in cases.items():
        server.replies[path] = Reply(
            document(server.http(path)), headers={"Content-Type": "application/json"} | headers
        )
        metadata = await fetch.get(server.http(path))
        assert metadata.expires_at - metadata.fetched_at == lifetime, path


async def test_cached_until_stale_then_fetched_again(server: DocumentServer) -> None:
    client_id = server.http("/cached")
    server.replies["/cached"] = Reply(
        document(client_id), headers={"Content-Type": "application/json", "Cache-Control": "max-age=600"}
    )
    clock = Clock()
    fetch = fetcher(clock=clock)
    first = await fetch.get(client_id)
    clock.now += 599
    assert await fetch.get(client_id) is first
    assert server.paths_hit() == ["/cached"]
    server.replies["/cached"] = Reply(document(client_id, client_name="Renamed"))
    clock.now += 2
    assert (await fetch.get(client_id)).client_name == "Renamed"
    assert server.paths_hit() == ["/cached", "/cached"]
    fetch.forget(client_id)
    await fetch.get(client_id)
    assert len(server.hits) == 3


async def test_refusals_are_not_cached(server: DocumentServer) -> None:
    client_id = server.http("/flaky")
    fetch = fetcher()
    server.replies["/flaky"] = Reply(document(client_id), status=503)
    with pytest.raises(CimdRefused):
        await fetch.get(client_id)
    server.replies["/flaky"] = Reply(document(client_id) | {"redirect_uris": []})
    with pytest.raises(CimdRefused):
        await fetch.get(client_id)
    server.replies["/flaky"] = Reply(document(client_id))
    assert (await fetch.get(client_id)).client_id == client_id
    assert len(server.hits) == 3


async def test_concurrent_requests_share_one_fetch(server: DocumentServer) -> None:
    client_id = server.http("/popular")
    server.replies["/popular"] = Reply(document(client_id), delay=0.2)
    fetch = fetcher()
    results = await asyncio.gather(*(fetch.get(client_id) for _ in range(8)))
    assert all(result is results[0] for result in results)
    assert server.paths_hit() == ["/popular"]


async def test_a_waiter_that_gives_up_does_not_cancel_the_shared_fetch(server: DocumentServer) -> None:
    client_id = server.http("/patience")
    server.replies["/patience"] = Reply(document(client_id), delay=0.3)
    fetch = fetcher()
    impatient = asyncio.ensure_future(fetch.get(client_id))
    await asyncio.sleep(0.05)
    impatient.cancel()
    assert (await fetch.get(client_id)).client_id == client_id
    assert server.paths_hit() == ["/patience"]


async def test_cache_is_bounded(server: DocumentServer) -> None:
    fetch = fetcher(max_cached=2)
    for path in ("/one", "/two", "/three"):
        server.replies[path] = Reply(document(server.http(path)))
        await fetch.get(server.http(path))
    await fetch.get(server.http("/three"))
    await fetch.get(server.http("/two"))
    assert server.paths_hit() == ["/one", "/two", "/three"]
    await fetch.get(server.http("/one"))  # the oldest was dropped to make room
    assert server.paths_hit() == ["/one", "/two", "/three", "/one"]
