"""The YAML model: `backends:` and `agents:` maps in the seed's shape, plus DESIGN.md §1's named additions.

Every model is frozen and rejects unknown keys, so a typo is an error that names its YAML path rather than a
silently ignored setting. A backend is a one-of keyed by `auth_method` (the agentgateway habit), so each method's
`auth_config` is checked against exactly its own keys. Cross-references (which agent may reach which backend,
duplicate paths) are checked in `config/checks.py`; `config/loader.py` resolves `${ENV}` and `{file: …}` secrets.
The `rate_limits:` section's models are in `config/limits.py`.

The per-tool policy's settings (DESIGN.md §7: an agent's `tool_access`, `resource_access` and `prompt_access`, a
backend's `tool_scopes`) are only data here; `policy/` decides with them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    InstanceOf,
    SecretStr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from okta_agent_proxy.config.limits import RateLimits
from okta_agent_proxy.config.settings import is_loopback_host
from okta_agent_proxy.config.strict import Strict
from okta_agent_proxy.keys import InvalidKeyError, SigningKey, load_signing_key

AUTH_METHODS = ("okta-cross-app", "pre-shared-key", "service-account")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
# Headers a backend must never receive from the caller, whatever `forward_headers` says (DESIGN.md §2).
NEVER_FORWARDED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
    }
)


def _route_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    if any(c in value for c in "?#") or "//" in value or any(c.isspace() for c in value):
        raise ValueError("must be a plain path (no query, fragment, '//' or spaces)")
    return value.rstrip("/") or "/"


def _header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError("must be an HTTP header name")
    return value


def _forwardable_header(value: str) -> str:
    _header_name(value)
    if value.lower() in NEVER_FORWARDED:
        raise ValueError(f"{value} is never forwarded to a backend")
    return value


def _glob(value: str) -> str:
    # A control character cannot be typed into a tool name on purpose; in a glob it is a paste accident that would
    # silently match nothing (or only a hostile name).
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def http_url(value: str, *, require_https: bool) -> str:
    """An absolute URL without query or fragment; https unless on loopback when `require_https`."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if require_https and parts.scheme != "https" and not is_loopback_host(parts.hostname):
        raise ValueError("must use https (plain http is allowed only on loopback hosts)")
    return value.rstrip("/")


def _backend_url(value: str) -> str:
    return http_url(value, require_https=False)


def _authority_url(value: str) -> str:
    return http_url(value, require_https=True)


RoutePath = Annotated[str, AfterValidator(_route_path)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
ForwardableHeader = Annotated[str, AfterValidator(_forwardable_header)]
Scope = Annotated[str, Field(min_length=1, pattern=r"^[\x21\x23-\x5b\x5d-\x7e]+$")]
ClientNameGlob = Annotated[str, Field(min_length=1)]
GroupName = Annotated[str, Field(min_length=1)]
# A name glob of DESIGN.md §7: fnmatch (`*`, `?`, `[…]`), matched case-sensitively (fnmatchcase).
NameGlob = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_glob)]


class PreSharedKeyAuth(Strict):
    """A static key sent in one header on every request (`header_name`, default X-API-Key)."""

    key: SecretStr = Field(description="The key; prefer ${ENV} or {file: …}.")
    header_name: HeaderName = Field("X-API-Key", description="The header that carries the key.")

    @field_validator("key")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


class ServiceAccountAuth(Strict):
    """HTTP Basic with a service account's username and password."""

    username: str = Field(min_length=1, description="Service account user name (HTTP Basic).")
    password: SecretStr = Field(description="Its password; prefer ${ENV} or {file: …}.")

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("must not contain ':' (HTTP Basic)")
        return value


class CrossAppAuth(Strict):
    """Okta Cross App Access: ID-JAG from Okta (RFC 8693), then the JWT-bearer grant (RFC 7523) at the backend AS."""

    id_jag_mode: Literal["static", "dynamic"] = Field(
        "static", description="static: the target AS from this config; dynamic: discovered (RFC 9728, RFC 8414)."
    )
    target_authorization_server: Annotated[str, AfterValidator(_authority_url)] | None = Field(
        None, description="Issuer of the backend's authorization server (the ID-JAG audience)."
    )
    target_token_endpoint: Annotated[str, AfterValidator(_authority_url)] | None = Field(
        None, description="Token endpoint of the backend's AS (step 2: the JWT-bearer grant)."
    )
    target_client_id: str | None = Field(
        None, min_length=1, description="The gateway's client id at the backend's AS (default: the agent's)."
    )
    target_client_secret: SecretStr | None = Field(
        None, description="With target_client_id: client_secret_basic at the backend's AS instead of the agent key."
    )
    scopes: tuple[Scope, ...] = Field((), description="Scopes requested at steps 1 and 2 (custom scopes only).")
    resource: Annotated[str, AfterValidator(_backend_url)] | None = Field(
        None, description="RFC 8707 resource of the backend (default: its url)."
    )
    client_assertion_audience: Literal["token_endpoint", "issuer"] = Field(
        "token_endpoint", description="`aud` of client assertions: the token URL (Okta) or the AS issuer (rfc7523bis)."
    )
    subject_token: Literal["access_token", "id_token"] = Field(
        "access_token", description="What step 1 exchanges: the caller's access token, or an ID token it supplies."
    )
    id_token_header: HeaderName | None = Field(
        None, description="The request header that carries the ID token (subject_token: id_token)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CrossAppAuth:
        if self.id_jag_mode == "static":
            missing = [
                name for name in ("target_authorization_server", "target_token_endpoint") if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"id_jag_mode static needs {' and '.join(missing)}")
        if self.target_client_secret is not None and self.target_client_id is None:
            raise ValueError("target_client_secret needs target_client_id")
        if self.subject_token == "id_token" and self.id_token_header is None:
            raise ValueError("subject_token id_token needs id_token_header")
        return self


class BackendCommon(Strict):
    url: Annotated[str, AfterValidator(_backend_url)] = Field(description="Base URL of the MCP server.")
    paths: list[RoutePath] = Field(min_length=1, description="Gateway path prefixes routed to this backend.")
    enabled: bool = Field(True, description="A disabled backend answers 404, as if absent.")
    timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description=(
            "Longest wait for name lookup, connect and the response headers together (POST, GET, DELETE), and "
            "for each next byte of a JSON answer; over → 504."
        ),
    )
    stream_idle_timeout_seconds: float = Field(
        300.0, gt=0, le=86400, description="Longest gap between the bytes of an SSE stream once it has started."
    )
    required_scopes: tuple[Scope, ...] = Field((), description="Scopes every caller token must carry.")
    method_scopes: dict[str, tuple[Scope, ...]] = Field(
        default_factory=dict, description='Scopes per MCP method, e.g. {"tools/call": [mcp:write]}.'
    )
    forward_headers: tuple[ForwardableHeader, ...] = Field(
        (), description="Extra request headers passed on to the backend."
    )
    tool_scopes: dict[NameGlob, tuple[Scope, ...]] = Field(
        default_factory=dict,
        description=(
            'Tool-name glob → scopes a caller\'s token must also carry to call a matching tool, e.g. {"update_*": '
            "[employees:write]}; every matching glob's scopes are needed. Without them: 403 insufficient_scope "
            "naming them (step-up); the tool is still listed."
        ),
    )


class CrossAppBackend(BackendCommon):
    auth_method: Literal["okta-cross-app"]
    auth_config: CrossAppAuth


class PreSharedKeyBackend(BackendCommon):
    auth_method: Literal["pre-shared-key"]
    auth_config: PreSharedKeyAuth


class ServiceAccountBackend(BackendCommon):
    auth_method: Literal["service-account"]
    auth_config: ServiceAccountAuth


Backend = Annotated[CrossAppBackend | PreSharedKeyBackend | ServiceAccountBackend, Field(discriminator="auth_method")]


def _signing_key(value: Any, info: ValidationInfo) -> SigningKey | None:
    if value is None or isinstance(value, SigningKey):
        return value
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str | dict):
        raise ValueError("must be a PEM string or a JWK object")
    try:
        return load_signing_key(value, info.data.get("key_id"))
    except InvalidKeyError as exc:
        raise ValueError(str(exc)) from None


class AccessRule(Strict):
    """Which names of one backend an agent sees and may use (DESIGN.md §7): a name passes when `allow` is absent or
    one of its globs matches, and no `deny` glob matches. One rule serves the list and the call, so a hidden name
    can never be called and a callable one is never hidden."""

    allow: tuple[NameGlob, ...] | None = Field(
        None,
        description=(
            "fnmatch globs (`*`, `?`, `[…]`), case-sensitive; only matching names pass. Absent: every name; `[]`: none."
        ),
    )
    deny: tuple[NameGlob, ...] = Field((), description="fnmatch globs, case-sensitive; a match is hidden (deny wins).")


class Agent(Strict):
    client_id: str = Field(min_length=1, description="The agent's Okta client id; signs token exchanges.")
    inbound_client_ids: tuple[str, ...] | None = Field(
        None,
        description="cid/client_id/azp values of caller tokens that identify this agent (default [client_id]).",
    )
    key_id: str | None = Field(None, min_length=1, description="kid of the key (default: JWK kid or thumbprint).")
    private_key: Annotated[
        InstanceOf[SigningKey] | None,
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]}),
    ] = Field(None, description="PEM (PKCS#8) or JWK private key; prefer ${ENV} or {file: …}.")
    client_names: tuple[ClientNameGlob, ...] = Field(
        (),
        description=(
            "Front door: globs (fnmatch) over the client_name a client registered dynamically, e.g. "
            '"Claude Code (*)"; a match makes it this agent. Declared by the client, not verified.'
        ),
    )
    scopes: tuple[Scope, ...] = Field(("mcp:read",), description="Scopes every caller token must carry.")
    backend_access: tuple[str, ...] = Field((), description="Backends this agent may reach (deny by default).")
    tool_access: dict[str, AccessRule] = Field(
        default_factory=dict,
        description=(
            "Backend name → which of its tools this agent sees in tools/list and may call (globs over tool "
            "names). A backend not listed: every tool (backend_access still applies)."
        ),
    )
    resource_access: dict[str, AccessRule] = Field(
        default_factory=dict,
        description=(
            "Backend name → which of its resources this agent sees and may read (globs over a resource's uri, a "
            "template's uriTemplate, and the URI of resources/read)."
        ),
    )
    prompt_access: dict[str, AccessRule] = Field(
        default_factory=dict,
        description="Backend name → which of its prompts this agent sees and may get (globs over prompt names).",
    )
    enabled: bool = Field(True, description="A disabled agent is denied everything (403).")

    _parse_key = field_validator("private_key", mode="before")(_signing_key)

    @property
    def caller_client_ids(self) -> tuple[str, ...]:
        return self.inbound_client_ids or (self.client_id,)

    def has_access_rules(self, backend: str) -> bool:
        """Whether this agent's answers from `backend` need filtering; without rules they stream untouched."""
        return backend in self.tool_access or backend in self.resource_access or backend in self.prompt_access


class AuditConfig(Strict):
    record_arguments: bool = Field(False, description="Record tool-call arguments in audit rows.")
    queue_size: int = Field(10_000, ge=1, le=10_000_000, description="Audit events waiting to be written, at most.")
    when_full: Literal["drop", "block"] = Field(
        "drop", description="A full queue drops the event (counted in a metric) or makes the request wait."
    )
    retention_days: int = Field(90, ge=1, description="Rows older than this are deleted.")


class FrontDoorConfig(Strict):
    """Who a front-door client is and what its tokens may carry (DESIGN.md §8); read only while FRONT_DOOR is on."""

    default_agent: str | None = Field(
        None,
        description=(
            "The agent of a front-door client that no agent's inbound_client_ids or client_names matches "
            "(unset: such a client gets 403). Must name a configured agent."
        ),
    )
    default_scopes: tuple[Scope, ...] = Field(("mcp:read",), description="Scopes every signed-in user may be granted.")
    scopes_by_group: dict[GroupName, tuple[Scope, ...]] = Field(
        default_factory=dict,
        description=(
            "Okta group name → further scopes for its members (from the ID token's groups claim, which the app's "
            "groups claim filter must send)."
        ),
    )


class GatewayConfig(Strict):
    backends: dict[str, Backend] = Field(default_factory=dict)
    agents: dict[str, Agent] = Field(default_factory=dict)
    audit: AuditConfig = AuditConfig()
    rate_limits: RateLimits = RateLimits()
    front_door: FrontDoorConfig = FrontDoorConfig()


def config_schema() -> dict[str, Any]:
    """The JSON Schema of config.yaml (after `${ENV}` / `{file: …}` references are resolved)."""
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Okta Agent Proxy config.yaml"
    return schema
