"""No secret leaves the gateway through a side channel (issue 5): not in logs (structlog at DEBUG, JSON; stdlib
logging of aiohttp, SQLAlchemy and the rest at DEBUG), not in any column of any table of the store, not in
`/metrics`, not in any answer the gateway gives (bodies and headers), errors included.

The secrets are real and used: a pre-shared key (given as `${ENV}`), a service account's password (and its Basic
form), two agents' private keys (PKCS#8 PEM and JWK) plus a third whose public half Okta does not know, a
`target_client_secret`, the inbound access and ID tokens of every call, and everything the Okta emulator
received or issued — client assertions, subject tokens, ID-JAGs, backend access tokens, `Authorization` headers.
They travel every path: successes on each auth method, 401s (none, expired, tampered, wrong audience, an ID token,
in a query string or as Basic, a header too large for the parser), 403s, 404s, 413, a parse error, 502s
(unreachable, credential rejected, `invalid_client`), 503s (IdP token endpoint and JWKS down), 504, a stream cut
by its backend. Each check first proves the channel was captured (positive controls), then looks for every secret
and for each JWT's signature on its own.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from sqlalchemy import select

from okta_agent_proxy.devkit.okta_emulator import ORG, App, AuthorizationServer, User, XaaPolicy
from okta_agent_proxy.observability.logging import configure
from okta_agent_proxy.store.config_store import save_config
from okta_agent_proxy.store.models import Model
from tests.support.backends import RecordingBackend, running_backend
from tests.support.gateway import basic_backend, psk_backend
from tests.support.processes import free_port
from tests.support.stacks import (
    AUDIENCE,
    BACKEND_AS,
    GATEWAY_AS,
    Answer,
    AuditedGateway,
    RecordingOktaEmulator,
    ValidatingBackend,
    audited_gateway,
    database_url,
    ec_agent_key,
    rsa_agent_key,
    send,
    validating_backend,
    xaa_backend,
)

SECRET_AS = "aus-secret"  # its step 2 authenticates with target_client_id / target_client_secret
PSK = "psk-" + secrets.token_urlsafe(24)
SVC_USER, SVC_PASSWORD = "svc-gateway", "pw-" + secrets.token_urlsafe(24)
TARGET_CLIENT, TARGET_SECRET = "0oa_target_client", "tcs-" + secrets.token_urlsafe(24)
PEM_AGENT, JWK_AGENT, BAD_AGENT = "wlp_pem_agent", "wlp_jwk_agent", "wlp_bad_agent"
ALICE, BOB = User("alice@example.com"), User("bob@example.com")
CAROL, DAVE = User("carol@example.com"), User("dave@example.com")
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"q": "hello"}}}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MAX_BODY = 4096


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Stack:
    idp: RecordingOktaEmulator
    backend: RecordingBackend
    xaa: ValidatingBackend
    xaa_secret: ValidatingBackend
    gateway: AuditedGateway
    http: aiohttp.ClientSession
    fixed_secrets: list[str]
    caller_tokens: list[str] = field(default_factory=list)  # every inbound token minted for a call
    answers: list[Answer] = field(default_factory=list)

    def token(self, user: User = ALICE, client_id: str = PEM_AGENT, **kwargs: Any) -> str:
        kwargs.setdefault("scopes", ["mcp:read"])
        token = self.idp.mint_access_token(GATEWAY_AS, user=user, client_id=client_id, **kwargs)
        self.caller_tokens.append(token)
        return token

    def id_token(self, client_id: str) -> str:
        token = self.idp.mint_id_token(GATEWAY_AS, user=ALICE, client_id=client_id)
        self.caller_tokens.append(token)
        return token

    async def call(self, path: str, token: str | None, body: Any = LIST, **kwargs: Any) -> Answer:
        answer = await send(self.http, self.gateway.url(path), token=token, body=body, **kwargs)
        self.answers.append(answer)
        return answer

    def all_secrets(self) -> dict[str, str]:
        """Every secret, and fragments of the long ones (a truncated secret is still a leak), by a printable label
        (never the secret itself, so that a failure message does not leak it)."""
        found: dict[str, str] = {}
        for i, value in enumerate(self.fixed_secrets):
            found |= fragments(f"configured secret #{i}", value)
        tokens = [*self.caller_tokens, *self.idp.issued, *self.idp.client_assertions()]
        for seen in self.idp.received:
            tokens += seen.form.get("subject_token", []) + seen.form.get("assertion", [])
            if seen.authorization:
                found |= fragments(f"credentials sent to the emulator ({seen.auth_server})", seen.authorization)
        for i, token in enumerate(tokens):
            found[f"JWT #{i}"] = token
            found |= fragments(f"signature of JWT #{i}", token.rsplit(".", 1)[-1])
        return found


def fragments(label: str, secret: str, size: int = 24) -> dict[str, str]:
    """The secret, and for a long one its start, middle and end (`size` characters each)."""
    found = {label: secret}
    if len(secret) >= 2 * size:
        middle = len(secret) // 2 - size // 2
        found |= {
            f"{label}, start": secret[:size],
            f"{label}, middle": secret[middle : middle + size],
            f"{label}, end": secret[-size:],
        }
    return found


@asynccontextmanager
async def stack(database: str) -> AsyncIterator[Stack]:
    pem, jwk, bad, unregistered = (
        rsa_agent_key("pem-key-1"),
        ec_agent_key("jwk-key-1"),
        ec_agent_key("bad-key-1"),
        ec_agent_key("bad-key-1"),
    )
    servers = [
        AuthorizationServer(GATEWAY_AS, AUDIENCE),
        AuthorizationServer(BACKEND_AS, "api://backend", scopes=("backend:read",)),
        AuthorizationServer(SECRET_AS, "api://secret", scopes=("backend:read",)),
    ]
    apps = [
        App(PEM_AGENT, "PEM agent", public_jwk=pem.public_jwk),
        App(JWK_AGENT, "JWK agent", public_jwk=jwk.public_jwk),
        App(BAD_AGENT, "Agent with another key", public_jwk=unregistered.public_jwk),
        App(TARGET_CLIENT, "The agents' client at the secret AS", client_secret=TARGET_SECRET),
    ]
    policies = [XaaPolicy(agent, BACKEND_AS) for agent in (PEM_AGENT, JWK_AGENT, BAD_AGENT)]
    policies += [XaaPolicy(agent, SECRET_AS, target_client_id=TARGET_CLIENT) for agent in (PEM_AGENT, JWK_AGENT)]
    async with (
        RecordingOktaEmulator(
            auth_servers=servers, users=[ALICE, BOB, CAROL, DAVE], apps=apps, xaa_policies=policies
        ) as idp,
        running_backend() as backend,
        validating_backend(idp, BACKEND_AS) as xaa,
        validating_backend(idp, SECRET_AS) as xaa_secret,
    ):
        backends = {
            "psk": psk_backend(backend.url("/mcp"), "/psk", key="${GATEWAY_TEST_PSK}"),
            "psk-rejected": psk_backend(backend.url("/unauthorized"), "/psk-rejected", key=PSK),
            "svc": basic_backend(backend.url("/mcp"), "/svc", username=SVC_USER, password=SVC_PASSWORD),
            "svc-rejected": basic_backend(
                backend.url("/unauthorized"), "/svc-rejected", username=SVC_USER, password=SVC_PASSWORD
            ),
            "sse-dies": psk_backend(backend.url("/die-sse"), "/sse-dies", key=PSK),
            "down": psk_backend(f"http://127.0.0.1:{free_port()}/mcp", "/down", key=PSK, timeout_seconds=2),
            "silent": psk_backend(backend.url("/silent"), "/silent", key=PSK, timeout_seconds=0.3),
            "xaa": xaa_backend(idp, xaa.resource, "/xaa"),
            "xaa-idt": xaa_backend(
                idp, xaa.resource, "/xaa-idt", subject_token="id_token", id_token_header="X-Id-Token"
            ),
            "xaa-secret": xaa_backend(
                idp,
                xaa_secret.resource,
                "/xaa-secret",
                auth_server=SECRET_AS,
                target_client_id=TARGET_CLIENT,
                target_client_secret=TARGET_SECRET,
            ),
        }
        everything = list(backends)
        config = {
            "backends": backends,
            "agents": {
                "pem-agent": {
                    "client_id": PEM_AGENT,
                    "key_id": "pem-key-1",
                    "private_key": pem.config_value,
                    "backend_access": everything,
                },
                "jwk-agent": {"client_id": JWK_AGENT, "private_key": jwk.config_value, "backend_access": everything},
                "bad-agent": {"client_id": BAD_AGENT, "private_key": bad.config_value, "backend_access": everything},
            },
            "audit": {"record_arguments": True},
        }
        settings = {
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_ISSUER": idp.issuer(GATEWAY_AS),
            "OKTA_AUDIENCE": AUDIENCE,
            "MAX_BODY_BYTES": MAX_BODY,
            "LOG_LEVEL": "DEBUG",
        }
        fixed = [PSK, SVC_PASSWORD, basic(SVC_USER, SVC_PASSWORD), TARGET_SECRET, basic(TARGET_CLIENT, TARGET_SECRET)]
        fixed += [*pem.secrets, *jwk.secrets, *bad.secrets]
        async with (
            audited_gateway(config, database, settings=settings, environ={"GATEWAY_TEST_PSK": PSK}) as gateway,
            aiohttp.ClientSession() as http,
        ):
            yield Stack(idp, backend, xaa, xaa_secret, gateway, http, fixed)


@pytest.fixture
def debug_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """stdlib logging at DEBUG into `caplog` (SQLAlchemy's statement log included, as `echo="debug"` would log);
    structlog is reset afterwards (see `log_like_serve`)."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    try:
        yield caplog
    finally:
        structlog.reset_defaults()


def log_like_serve(log_format: str) -> None:
    """structlog as `serve` sets it up, at DEBUG, writing to the stderr captured right now (call it from the test
    body: pytest swaps the captured streams between setup and call)."""
    configure("DEBUG", log_format)
    # `configure` caches each logger on first use; here no logger may outlive this test's captured stderr.
    structlog.configure(cache_logger_on_first_use=False)


async def exercise(s: Stack) -> None:
    """Every path, with both agent keys where a key is used."""
    for agent in (PEM_AGENT, JWK_AGENT):
        token = s.token(client_id=agent)
        for path in ("/psk", "/svc", "/xaa", "/xaa-secret"):
            assert (await s.call(path, token)).status == 200, path
            assert (await s.call(path, s.token(client_id=agent), CALL)).status == 200, path
        assert (await s.call("/xaa-idt", token)).status == 401  # the ID token is missing (nothing cached yet)
        answer = await s.call("/xaa-idt", token, headers={"X-Id-Token": s.id_token(agent)})
        assert answer.status == 200, answer.body
        for path in ("/psk-rejected", "/svc-rejected", "/down"):
            assert (await s.call(path, token)).status == 502, path
        assert (await s.call("/silent", token)).status == 504
        answer = await s.call("/sse-dies", token)
        assert answer.status == 200 and b"event: error" in answer.body
        s.xaa.reject_next = 2
        assert (await s.call("/xaa", s.token(BOB, client_id=agent))).error == "backend_rejected_credential"
        assert (await s.call("/psk", token, raw=b"{not json")).status == 400
        assert (await s.call("/psk", token, {"blob": "x" * MAX_BODY})).status == 413
    # Okta refuses, or is down, or does not know the agent's key.
    policies = list(s.idp.xaa.policies)
    s.idp.xaa.policies.clear()
    assert (await s.call("/xaa", s.token(CAROL))).error == "token_exchange_failed"
    s.idp.xaa.policies.extend(policies)
    s.idp.set_token_endpoint_mode("down", auth_server_id=ORG)
    assert (await s.call("/xaa", s.token(DAVE))).error == "idp_unavailable"
    s.idp.set_token_endpoint_mode("ok")
    answer = await s.call("/xaa", s.token(client_id=BAD_AGENT))
    assert (answer.status, answer.error) == (502, "token_exchange_failed")
    # Inbound tokens that are refused, or carried where they must not be.
    good = s.token()
    header, payload, signature = good.split(".")
    refused: list[str | None] = [
        None,
        s.token(lifetime=-600),
        f"{header}.{payload}.{signature[::-1]}",
        s.token(audience="api://someone-else"),
        s.id_token(PEM_AGENT),
        s.token(client_id="0oa_stranger"),
    ]
    for bad in refused:
        assert (await s.call("/psk", bad)).status in (401, 403)
    assert (await s.call(f"/psk?access_token={good}", None)).status == 400
    assert (await s.call("/psk", None, headers={"Authorization": f"Basic {good}", "Cookie": f"t={good}"})).status == 401
    assert (await s.call("/psk", good, headers={"X-Agent-ID": "jwk-agent"})).status == 403
    assert (await s.call("/psk", s.token(scopes=["profile"]))).status == 403
    assert (await s.call("/nowhere", good)).status == 404
    answer = await s.call("/psk", good, INIT)
    session = answer.headers["Mcp-Session-Id"]
    assert (await s.call("/psk", s.token(BOB), headers={"Mcp-Session-Id": session})).status == 404
    # Headers too large for the HTTP parser (aiohttp logs the start of what it rejects): a JWT, and an opaque token
    # whose first bytes are all secret. The answer is the gateway's JSON 400, quoting nothing (see also
    # `test_an_oversized_header_is_not_echoed_back`).
    assert (await s.call("/psk", good + "A" * 16_384)).status in (400, 413, 431)
    opaque = "opaque-" + secrets.token_urlsafe(30)
    s.fixed_secrets.append(opaque)
    assert (await send(s.http, s.gateway.url("/psk"), token=opaque + "A" * 16_384)).status in (400, 413, 431)
    for path in ("/healthz", "/readyz", "/.well-known/oauth-protected-resource/psk"):
        s.answers.append(await send(s.http, s.gateway.url(path), method="GET"))
    # Last: the JWKS is down when a token names a key the gateway has not fetched.
    s.idp.rotate_keys(GATEWAY_AS)
    s.idp.set_jwks_mode("down")
    assert (await s.call("/psk", s.token())).error == "idp_unavailable"
    s.idp.set_jwks_mode("ok")


async def dump_store(s: Stack) -> str:
    """Every row of every table of the store, every column, as text."""
    await s.gateway.audit.flush()
    lines = []
    async with s.gateway.store.engine.connect() as connection:
        for table in Model.metadata.sorted_tables:
            for row in (await connection.execute(select(table))).mappings():
                lines.append(f"{table.name}: {json.dumps(dict(row), default=str)}")
    return "\n".join(lines)


def assert_absent(channel: str, haystack: str, secrets_by_label: dict[str, str]) -> None:
    leaked = sorted(label for label, value in secrets_by_label.items() if value in haystack)
    assert not leaked, f"secrets found in {channel}: {leaked}"


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_no_secret_reaches_logs_store_metrics_or_answers(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], debug_logging: pytest.LogCaptureFixture, log_format: str
) -> None:
    log_like_serve(log_format)
    async with database_url("sqlite", tmp_path) as url, stack(url) as s:
        await exercise(s)
        # The config tables too, as `serve` fills them from the loaded file.
        assert await save_config(s.gateway.store.engine, s.gateway.loaded.config, file_hash="0" * 64, source="t.yaml")
        store_text = await dump_store(s)
        async with s.http.get(s.gateway.url("/metrics")) as response:
            metrics_text = await response.text()
        answers_text = "\n".join(
            f"{a.status} {json.dumps(a.headers)} {a.body.decode(errors='replace')}" for a in s.answers
        )
        rows = await s.gateway.rows()
        secrets_by_label = s.all_secrets()
        # Positive controls: the secrets were really used, and every channel really captured something.
        assert s.backend.requests and all(r.headers.get("X-API-Key") in (None, PSK) for r in s.backend.requests)
        assert any(
            r.headers.get("Authorization") == f"Basic {basic(SVC_USER, SVC_PASSWORD)}" for r in s.backend.requests
        )
        assert s.xaa_secret.accepted and s.xaa.accepted
        assert any(seen.authorization == f"Basic {basic(TARGET_CLIENT, TARGET_SECRET)}" for seen in s.idp.received)
        assert len(s.idp.client_assertions()) >= 8 and len(s.idp.id_jags()) >= 6
        assert len(rows) >= 40
        assert any(row["arguments"] for row in rows) and any(row["detail"] for row in rows)
        assert "oap_requests_total" in metrics_text
    out, err = capfd.readouterr()
    log_text = out + err
    expected_events = [
        "request",
        "token_exchange_completed",
        "token_exchange_refused",
        "token_exchange_misconfigured",
        "token_exchange_unavailable",
        "jwks_fetch_failed",
    ]
    if log_format == "json":
        events = {json.loads(line)["event"] for line in log_text.splitlines() if line.startswith("{")}
        assert set(expected_events) <= events, events
    else:
        assert all(event in log_text for event in expected_events), log_text[-2000:]
    stdlib_text = debug_logging.text
    loggers = {record.name.split(".")[0] for record in debug_logging.records}
    assert {"aiohttp", "sqlalchemy", "aiosqlite"} <= loggers, loggers  # aiohttp: the oversized header it rejected
    assert_absent("structlog output (stdout/stderr)", log_text, secrets_by_label)
    assert_absent("stdlib logging", stdlib_text, secrets_by_label)
    assert_absent("the store (every table, every column)", store_text, secrets_by_label)
    assert_absent("/metrics", metrics_text, secrets_by_label)
    assert_absent("the gateway's answers (bodies and headers)", answers_text, secrets_by_label)
    # And the caller's own tokens never reached a backend.
    seen_by_backends = json.dumps(
        [[r.path_qs, dict(r.headers), r.body.decode(errors="replace")] for r in s.backend.requests]
        + [s.xaa.tokens_seen, s.xaa_secret.tokens_seen]
    )
    assert_absent(
        "backend requests", seen_by_backends, {f"caller token #{i}": t for i, t in enumerate(s.caller_tokens)}
    )


async def test_an_oversized_header_is_not_echoed_back(tmp_path: Path) -> None:
    opaque = "opaque-" + secrets.token_urlsafe(30)
    async with (
        running_backend() as backend,
        database_url("sqlite", tmp_path) as url,
        audited_gateway({"backends": {"psk": psk_backend(backend.url("/mcp"), "/psk")}}, url) as gateway,
        aiohttp.ClientSession() as http,
    ):
        answer = await send(http, gateway.url("/psk"), token=opaque + "A" * 16_384)
        assert answer.status == 400
        assert opaque not in answer.body.decode(errors="replace")
        assert answer.json == {
            "error": "bad_request",
            "message": "the request could not be read as HTTP",
            "agent_id": None,
        }
        assert (
            await send(http, gateway.url("/psk"), token=None, body=LIST)
        ).status == 200  # and the gateway goes on serving
