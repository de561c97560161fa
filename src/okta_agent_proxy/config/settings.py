"""Process settings: environment variables, with `.env` read first and the real environment winning.

The names are the seed README's (`OKTA_DOMAIN`, `GATEWAY_PORT`, …) plus those in DESIGN.md §1 and §8 (the OAuth
front door). Everything a value implies (the list of allowed hosts, the accepted audiences, the trusted proxy
networks) is derived here, once, so the rest of the code reads finished values. A value that cannot be used (a key
that does not load, a glob that does not compile) fails here, at start, not at the first request that needs it;
what only the front door needs is checked by `front_door_problems`, since those variables are optional otherwise.
"""

from __future__ import annotations

import ipaddress
import resource
from functools import cached_property
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from okta_agent_proxy.frontdoor.redirects import RedirectPolicy
from okta_agent_proxy.frontdoor.tokens import ALGORITHM as FRONT_DOOR_ALGORITHM
from okta_agent_proxy.keys import InvalidKeyError, SigningKey, load_signing_key


def is_loopback_host(host: str | None) -> bool:
    """True for the hosts on which plain http is tolerated for IdP and AS URLs (dev and tests): `localhost` and
    loopback IP literals — never a DNS name that merely starts with "127."."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]`, lower-cased, without a trailing slash or the scheme's default port (RFC 6454 §6.1:
    browsers never send the default port)."""
    parts = urlsplit(origin.strip().rstrip("/").lower())
    if not parts.scheme or not parts.hostname:
        return origin.strip().rstrip("/").lower()
    try:
        port = parts.port
    except ValueError:
        return origin.strip().rstrip("/").lower()
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme):
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def _split_csv(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(item.strip() for item in value.split(",") if item.strip())


_SWITCH = {"on": "on", "true": "on", "1": "on", "off": "off", "false": "off", "0": "off"}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: str | None) -> tuple[IPNetwork, ...]:
    """`10.0.0.5, 10.1.0.0/16, fd00::/8` → networks (a bare address is a /32 or /128); ValueError naming the entry by
    position. Host bits set under a prefix (`10.0.0.5/8`) are refused: likely a typo for a narrower network."""
    networks = []
    for index, item in enumerate(_split_csv(value)):
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError:
            raise ValueError(f"entry {index + 1} is not an IP address or a CIDR network without host bits") from None
    return tuple(networks)


def _load_key(value: SecretStr) -> SigningKey:
    """The key, loaded to prove it can be used; ValueError with the loader's message (never the key) otherwise."""
    try:
        return load_signing_key(value.get_secret_value())
    except InvalidKeyError as exc:
        raise ValueError(str(exc)) from None


class Settings(BaseSettings):
    """The gateway's environment. Field names are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True, case_sensitive=True
    )

    OKTA_DOMAIN: str | None = Field(
        None,
        description=(
            "The Okta org, with or without scheme (none → https); Cross App Access step 1 goes to "
            "{OKTA_DOMAIN}/oauth2/v1/token."
        ),
    )
    OKTA_ISSUER: str | None = Field(
        None,
        description=(
            "Issuer of the caller tokens accepted: a custom AS …/oauth2/<id>. Unset with FRONT_DOOR off: nobody is "
            "authenticated and serve listens on loopback only; unset with FRONT_DOOR on: only the gateway's own "
            "tokens are accepted."
        ),
    )
    OKTA_AUDIENCE: str | None = Field(
        None,
        description=(
            "Comma-separated accepted `aud` values (default: GATEWAY_BASE_URL and GATEWAY_BASE_URL + "
            "each backend path)."
        ),
    )
    OKTA_JWKS_URI: str | None = Field(
        None,
        description=(
            "The issuer's keys (default: from {OKTA_ISSUER}/.well-known/oauth-authorization-server, then "
            "…/openid-configuration)."
        ),
    )
    OKTA_CLIENT_ID: str | None = Field(
        None,
        description=(
            "Client id of the gateway's own Okta OIDC web app, through which the front door logs users in (redirect "
            "URI {GATEWAY_BASE_URL}/oauth/callback) and, by default, signs Cross App Access for front-door callers."
        ),
    )
    OKTA_CLIENT_SECRET: SecretStr | None = Field(
        None, description="That app's client secret; or OKTA_CLIENT_PRIVATE_KEY."
    )
    OKTA_CLIENT_PRIVATE_KEY: SecretStr | None = Field(
        None,
        description=(
            "That app's private key, PEM or JWK JSON (private_key_jwt; register its public half in Okta); when set, "
            "used instead of OKTA_CLIENT_SECRET."
        ),
    )
    GATEWAY_BASE_URL: str | None = Field(
        None,
        description=(
            "Public URL (default http://localhost:{port}). With FRONT_DOOR on: the front door's issuer, so https "
            "(plain http on loopback hosts only) and no path."
        ),
    )
    GATEWAY_HOST: str = Field("127.0.0.1", description="Bind address.")
    GATEWAY_PORT: int = Field(8000, ge=0, le=65535, description="Listen port.")
    ALLOWED_HOSTS: str | None = Field(
        None,
        description=(
            "Comma-separated `Host` values accepted, a port optional (default: host of GATEWAY_BASE_URL, "
            "localhost, 127.0.0.1, [::1]); others → 421."
        ),
    )
    ALLOWED_ORIGINS: str | None = Field(
        None,
        description=(
            "Comma-separated `Origin` values accepted when the header is sent (default: origin of "
            "GATEWAY_BASE_URL); others → 403."
        ),
    )
    MAX_BODY_BYTES: int = Field(4 * 1024 * 1024, gt=0, description="Request body limit; larger → 413.")
    HEADER_READ_TIMEOUT_SECONDS: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "A new connection, or a request that has begun to arrive, must complete its headers within this; "
            "else the connection is closed."
        ),
    )
    KEEPALIVE_TIMEOUT_SECONDS: float = Field(
        75.0, gt=0, le=3600, description="An idle connection between requests is closed after this."
    )
    SHUTDOWN_DRAIN_SECONDS: float = Field(
        5.0,
        ge=0,
        le=3600,
        description=(
            "On SIGTERM, /readyz answers 503 at once and new connections are still accepted for this long (for "
            "load balancers to notice); then the gateway stops listening. SIGINT skips this window."
        ),
    )
    SHUTDOWN_GRACE_SECONDS: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "After the drain window, requests and streams in flight get this long to finish; streams still open "
            "then end with an SSE `error` event (audit outcome `gateway_shutdown`)."
        ),
    )
    MAX_CONNECTIONS: int | None = Field(
        None,
        ge=1,
        description=(
            "Client connections at most (default: 80 % of the open-file limit); at the limit the oldest connection "
            "that has not sent a whole request, or else the longest idle, is closed to admit a new one."
        ),
    )
    METRICS_HOST: str | None = Field(
        None, description="Serve /metrics on this address instead of the main listener (with METRICS_PORT)."
    )
    METRICS_PORT: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /metrics on this port only (the main listener then answers 404 there).",
    )
    JWT_LEEWAY_SECONDS: int = Field(60, ge=0, le=600, description="Clock skew for exp/nbf/iat.")
    AGENT_IDENTIFICATION: Literal["token", "header"] = Field(
        "token",
        description=(
            "token: the agent whose inbound_client_ids hold the token's cid; header: X-Agent-ID alone "
            "(experiments only, logged on every request)."
        ),
    )
    CONFIG_PATH: str = Field("config/config.yaml", description="The YAML of backends and agents.")
    DATABASE_URL: str = Field(
        "sqlite:///./data/okta-agent-proxy.db",
        description="Audit and config store: sqlite:///path or postgresql://… (the async driver is chosen for you).",
    )
    AUDIT_ENABLED: bool = Field(True, description="Write an audit row per request (false: no audit writer).")
    REDIS_URL: str | None = Field(
        None,
        description=(
            "redis://, rediss:// or unix:// URL: the backend-credential cache and its single-flight shared by "
            "replicas (needs SESSION_SECRET). Down: each process caches on its own; requests still succeed."
        ),
    )
    SESSION_SECRET: SecretStr | None = Field(
        None,
        description=(
            "Seals the MCP session ids clients see (at least 32 bytes; the same on every replica). Unset: a key is "
            "generated into DATA_DIR/session.key, shared by --workers but not by other hosts."
        ),
    )
    SESSION_SECRET_PREVIOUS: SecretStr | None = Field(
        None, description="A former SESSION_SECRET, still accepted to open session ids (rotation)."
    )
    DATA_DIR: str = Field("./data", description="Where the gateway keeps the files it makes (session.key, state.key).")
    FRONT_DOOR: Literal["on", "off"] = Field(
        "off",
        description=(
            "on: the gateway is the OAuth authorization server stock MCP clients log in through (users sign in at "
            "Okta through OKTA_CLIENT_ID's app). Also true/false, 1/0."
        ),
    )
    STATE_ENCRYPTION_KEY: SecretStr | None = Field(
        None,
        description=(
            "Seals the Okta tokens the front door holds, its signing key in the store and its cookies (at least 32 "
            "bytes; the same on every replica). Unset: generated into DATA_DIR/state.key, shared by --workers but "
            "not by other hosts."
        ),
    )
    FRONT_DOOR_TOKEN_TTL_SECONDS: int = Field(
        3600, ge=60, le=86400, description="Lifetime of the access tokens the front door issues."
    )
    FRONT_DOOR_REFRESH_TTL_DAYS: int = Field(
        30, ge=1, le=365, description="Lifetime of a front-door grant's refresh tokens; then the user logs in again."
    )
    FRONT_DOOR_REFRESH_GRACE_SECONDS: int = Field(
        30,
        ge=0,
        le=300,
        description=(
            "A rotated refresh token presented again within this gets the same new pair (clients refreshing from "
            "several processes at once); after it, reuse revokes the grant."
        ),
    )
    FRONT_DOOR_REDIRECT_URIS: str | None = Field(
        None,
        description=(
            "Comma-separated globs over the whole redirect URI a client may register (default "
            "frontdoor.redirects.DEFAULT_REDIRECT_GLOBS: loopback http, any https, cursor://, vscode://, claude://). "
            "`*` is the only wildcard (`?` and `[` are literal) and a `*` in the host never leaves the host; plain "
            "http is refused off loopback whatever the globs say."
        ),
    )
    FRONT_DOOR_CIMD: Literal["on", "off"] = Field(
        "on",
        description=(
            "on: an https client_id is a client metadata document the gateway fetches (allow that egress, e.g. "
            "claude.ai); off: clients must register. Also true/false, 1/0."
        ),
    )
    FRONT_DOOR_SIGNING_KEY: SecretStr | None = Field(
        None,
        description=(
            "ES256 (EC P-256) private key, PEM or JWK, that signs the front door's tokens. Unset: generated once "
            "into the store, sealed with STATE_ENCRYPTION_KEY, shared by every replica."
        ),
    )
    FRONT_DOOR_SIGNING_KEY_PREVIOUS: SecretStr | None = Field(
        None, description="A former FRONT_DOOR_SIGNING_KEY, still published and accepted (rotation)."
    )
    FRONT_DOOR_AGENT_CLIENT_ID: str | None = Field(
        None,
        description=(
            "An Okta AI agent (wlp…) linked to OKTA_CLIENT_ID's app: it, not the app, signs Cross App Access for "
            "front-door callers. With FRONT_DOOR_AGENT_PRIVATE_KEY, or neither."
        ),
    )
    FRONT_DOOR_AGENT_PRIVATE_KEY: SecretStr | None = Field(
        None, description="That AI agent's private key, PEM or JWK JSON. With FRONT_DOOR_AGENT_CLIENT_ID, or neither."
    )
    TRUSTED_PROXIES: str | None = Field(
        None,
        description=(
            "Comma-separated IP addresses and CIDR networks of the load balancers whose X-Forwarded-For is believed "
            "(per-client limits); unset: the peer address is the client."
        ),
    )
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    LOG_FORMAT: Literal["json", "console"] = Field("json", description="json (one object per line) or console.")

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("SESSION_SECRET", "SESSION_SECRET_PREVIOUS", "STATE_ENCRYPTION_KEY")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value

    @field_validator(
        "OKTA_CLIENT_ID",
        "OKTA_CLIENT_SECRET",
        "OKTA_CLIENT_PRIVATE_KEY",
        "FRONT_DOOR_REDIRECT_URIS",
        "FRONT_DOOR_SIGNING_KEY",
        "FRONT_DOOR_SIGNING_KEY_PREVIOUS",
        "FRONT_DOOR_AGENT_CLIENT_ID",
        "FRONT_DOOR_AGENT_PRIVATE_KEY",
        "TRUSTED_PROXIES",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`NAME=` in a .env (env.template's blanks) means unset, not an empty secret that counts as given."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("FRONT_DOOR", "FRONT_DOOR_CIMD", mode="before")
    @classmethod
    def _switch(cls, value: object) -> object:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            return _SWITCH.get(value.strip().lower(), value)
        return value

    @field_validator("FRONT_DOOR_SIGNING_KEY", "FRONT_DOOR_SIGNING_KEY_PREVIOUS")
    @classmethod
    def _es256_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and _load_key(value).algorithm != FRONT_DOOR_ALGORITHM:
            raise ValueError(f"must be an EC P-256 key ({FRONT_DOOR_ALGORITHM})")
        return value

    @field_validator("OKTA_CLIENT_PRIVATE_KEY", "FRONT_DOOR_AGENT_PRIVATE_KEY")
    @classmethod
    def _private_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _load_key(value)
        return value

    @field_validator("FRONT_DOOR_REDIRECT_URIS")
    @classmethod
    def _redirect_globs(cls, value: str | None) -> str | None:
        if value is not None and not RedirectPolicy.from_setting(value).globs:
            raise ValueError("must name at least one glob")
        return value

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _check_proxies(cls, value: str | None) -> str | None:
        _networks(value)
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value or None

    @property
    def front_door(self) -> bool:
        return self.FRONT_DOOR == "on"

    @property
    def front_door_cimd(self) -> bool:
        return self.FRONT_DOOR_CIMD == "on"

    @property
    def authenticates(self) -> bool:
        """Whether callers are authenticated at all: by Okta's tokens (OKTA_ISSUER), the front door's, or both.
        False is the loopback-only mode in which every caller reaches the backends unchecked."""
        return bool(self.OKTA_ISSUER) or self.front_door

    @cached_property
    def trusted_proxies(self) -> tuple[IPNetwork, ...]:
        return _networks(self.TRUSTED_PROXIES)

    @cached_property
    def redirect_policy(self) -> RedirectPolicy:
        """Which redirect URIs front-door clients may register (FRONT_DOOR_REDIRECT_URIS, else the default)."""
        return RedirectPolicy.from_setting(self.FRONT_DOOR_REDIRECT_URIS)

    def front_door_refusals(self) -> list[tuple[str, str]]:
        """(variable, reason) for each setting the front door cannot run with; none while FRONT_DOOR is off. A
        reason never quotes a value (some of these are secrets)."""
        if not self.front_door:
            return []
        refusals: list[tuple[str, str]] = []
        if not self.OKTA_DOMAIN:
            refusals.append(("OKTA_DOMAIN", "not set: the front door logs users in at the Okta org"))
        if not self.OKTA_CLIENT_ID:
            refusals.append(("OKTA_CLIENT_ID", "not set: the front door logs users in as the gateway's own Okta app"))
        if self.OKTA_CLIENT_SECRET is None and self.OKTA_CLIENT_PRIVATE_KEY is None:
            refusals.append(
                (
                    "OKTA_CLIENT_SECRET",
                    "neither it nor OKTA_CLIENT_PRIVATE_KEY is set: the front door cannot redeem Okta's codes",
                )
            )
        if self.GATEWAY_BASE_URL is not None:
            parts = urlsplit(self.GATEWAY_BASE_URL)
            if parts.scheme != "https" and not is_loopback_host(parts.hostname):
                refusals.append(
                    ("GATEWAY_BASE_URL", "must use https with FRONT_DOOR on (plain http only on loopback hosts)")
                )
            if parts.path not in ("", "/"):
                refusals.append(
                    (
                        "GATEWAY_BASE_URL",
                        "must have no path with FRONT_DOOR on: clients find the metadata at the origin",
                    )
                )
        if (self.FRONT_DOOR_AGENT_CLIENT_ID is None) != (self.FRONT_DOOR_AGENT_PRIVATE_KEY is None):
            missing = (
                "FRONT_DOOR_AGENT_CLIENT_ID"
                if self.FRONT_DOOR_AGENT_CLIENT_ID is None
                else "FRONT_DOOR_AGENT_PRIVATE_KEY"
            )
            refusals.append(
                (missing, "not set: FRONT_DOOR_AGENT_CLIENT_ID and FRONT_DOOR_AGENT_PRIVATE_KEY go together")
            )
        return refusals

    def front_door_problems(self) -> list[str]:
        """`VARIABLE: reason` for each of `front_door_refusals`."""
        return [f"{variable}: {reason}" for variable, reason in self.front_door_refusals()]

    @property
    def replicated(self) -> bool:
        """Settings that suggest several replicas: shared state in Redis or PostgreSQL."""
        return bool(self.REDIS_URL) or self.DATABASE_URL.startswith("postgres")

    @field_validator("GATEWAY_BASE_URL")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @cached_property
    def max_connections(self) -> int:
        """`MAX_CONNECTIONS`, or 80 % of the process's open-file limit: the rest stays for backend connections,
        the database and logs, so a flood of clients cannot take the descriptors the gateway needs to answer."""
        if self.MAX_CONNECTIONS is not None:
            return self.MAX_CONNECTIONS
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(1, int(soft * 0.8)) if soft != resource.RLIM_INFINITY else 65536

    @cached_property
    def base_url(self) -> str:
        return self.GATEWAY_BASE_URL or f"http://localhost:{self.GATEWAY_PORT}"

    @cached_property
    def allowed_hosts(self) -> frozenset[str]:
        """`Host` header values accepted; an entry without a port matches any port."""
        configured = _split_csv(self.ALLOWED_HOSTS)
        if configured:
            return frozenset(h.lower() for h in configured)
        base_host = urlsplit(self.base_url).hostname or "localhost"
        return frozenset({base_host.lower(), "localhost", "127.0.0.1", "[::1]"})

    @cached_property
    def allowed_origins(self) -> frozenset[str]:
        configured = _split_csv(self.ALLOWED_ORIGINS)
        if configured:
            return frozenset(normalize_origin(o) for o in configured)
        parts = urlsplit(self.base_url)
        return frozenset({normalize_origin(f"{parts.scheme}://{parts.netloc}")})

    @cached_property
    def audiences(self) -> tuple[str, ...]:
        return _split_csv(self.OKTA_AUDIENCE) or (self.base_url,)
