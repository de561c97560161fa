"""Process settings: environment variables, with `.env` read first and the real environment winning.

The names are the seed README's (`OKTA_DOMAIN`, `GATEWAY_PORT`, …) plus those in DESIGN.md §1. Everything a value
implies (the list of allowed hosts, the accepted audiences, the async database driver) is derived here, once, so
the rest of the code reads finished values.
"""

from __future__ import annotations

import ipaddress
import resource
from functools import cached_property
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
            "Issuer of the caller tokens accepted: a custom AS …/oauth2/<id>. Unset: nobody is "
            "authenticated and serve listens on loopback only."
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
    OKTA_CLIENT_ID: str | None = Field(None, description="The gateway's own Okta app (reserved).")
    OKTA_CLIENT_SECRET: SecretStr | None = Field(None, description="The gateway's own Okta app secret (reserved).")
    GATEWAY_BASE_URL: str | None = Field(None, description="Public URL (default http://localhost:{port}).")
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
    DATA_DIR: str = Field("./data", description="Where the gateway keeps the files it makes (session.key).")
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    LOG_FORMAT: Literal["json", "console"] = Field("json", description="json (one object per line) or console.")

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("SESSION_SECRET", "SESSION_SECRET_PREVIOUS")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value

    @field_validator("REDIS_URL")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value or None

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
