"""Settings (okta_agent_proxy.config.settings): `.env` is read, the real environment wins, derived values are right."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from okta_agent_proxy.config.loader import ConfigError, load, load_settings
from okta_agent_proxy.config.settings import Settings, is_loopback_host
from tests.unit.helpers import problems_of, write_yaml


def _env_file(directory: Path, text: str) -> str:
    path = directory / "test.env"
    path.write_text(text)
    return str(path)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OKTA_ISSUER")
    settings = Settings(_env_file=None)
    assert settings.GATEWAY_HOST == "127.0.0.1"
    assert settings.GATEWAY_PORT == 8000
    assert settings.MAX_BODY_BYTES == 4 * 1024 * 1024
    assert settings.JWT_LEEWAY_SECONDS == 60
    assert settings.AGENT_IDENTIFICATION == "token"
    assert settings.CONFIG_PATH == "config/config.yaml"
    assert settings.LOG_LEVEL == "INFO"
    assert settings.OKTA_ISSUER is None
    assert settings.REDIS_URL is None
    assert settings.base_url == "http://localhost:8000"


def test_dotenv_is_read(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path, "GATEWAY_PORT=9100\nOKTA_DOMAIN=dev-1.okta.com\nLOG_LEVEL=debug\n")
    settings = load_settings(env_file)
    assert settings.GATEWAY_PORT == 9100
    assert settings.OKTA_DOMAIN == "dev-1.okta.com"
    assert settings.LOG_LEVEL == "DEBUG"


def test_real_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _env_file(tmp_path, "GATEWAY_PORT=9100\nOKTA_DOMAIN=from-file.okta.com\n")
    monkeypatch.setenv("GATEWAY_PORT", "9200")
    settings = load_settings(env_file)
    assert settings.GATEWAY_PORT == 9200
    assert settings.OKTA_DOMAIN == "from-file.okta.com"


def test_default_dotenv_is_dot_env_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GATEWAY_PORT=9300\n")  # the autouse fixture made tmp_path the cwd
    assert load_settings().GATEWAY_PORT == 9300
    assert load_settings(None).GATEWAY_PORT == 8000


def test_missing_dotenv_is_not_an_error(tmp_path: Path) -> None:
    assert load_settings(str(tmp_path / "absent.env")).GATEWAY_PORT == 8000


def test_unknown_variables_in_dotenv_are_ignored(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path, "PARTNERS_API_KEY=abc\nSOMETHING_ELSE=1\n")
    assert load_settings(env_file).GATEWAY_PORT == 8000


def test_names_are_case_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("gateway_port", "1234")
    assert Settings(_env_file=None).GATEWAY_PORT == 8000


def test_dotenv_feeds_env_references_and_real_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _env_file(tmp_path, "PSK=from-dotenv\nHR_URL=http://from-dotenv:1/mcp\n")
    monkeypatch.setenv("HR_URL", "http://from-environment:2/mcp")
    config = write_yaml(
        tmp_path,
        {
            "backends": {
                "hr": {
                    "url": "${HR_URL}",
                    "paths": ["/hr"],
                    "auth_method": "pre-shared-key",
                    "auth_config": {"key": "${PSK}"},
                }
            }
        },
    )
    loaded = load(config, env_file=env_file)
    backend = loaded.config.backends["hr"]
    assert backend.url == "http://from-environment:2/mcp"
    assert backend.auth_config.key.get_secret_value() == "from-dotenv"  # type: ignore[union-attr]


# --- derived values ---------------------------------------------------------------------------------------------------


def test_derived_values_from_default_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9000")
    settings = Settings(_env_file=None)
    assert settings.base_url == "http://localhost:9000"
    assert settings.allowed_hosts == frozenset({"localhost", "127.0.0.1", "[::1]"})
    assert settings.allowed_origins == frozenset({"http://localhost:9000"})
    assert settings.audiences == ("http://localhost:9000",)


def test_derived_values_from_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BASE_URL", "https://Gateway.Example.com/")
    settings = Settings(_env_file=None)
    assert settings.base_url == "https://Gateway.Example.com"
    assert settings.allowed_hosts == frozenset({"gateway.example.com", "localhost", "127.0.0.1", "[::1]"})
    assert settings.allowed_origins == frozenset({"https://gateway.example.com"})
    assert settings.audiences == ("https://Gateway.Example.com",)


def test_base_url_with_port_and_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BASE_URL", "https://gw.example.com:8443/proxy")
    settings = Settings(_env_file=None)
    assert settings.base_url == "https://gw.example.com:8443/proxy"
    assert "gw.example.com" in settings.allowed_hosts
    assert settings.allowed_origins == frozenset({"https://gw.example.com:8443"})


def test_explicit_lists_replace_the_derived_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BASE_URL", "https://gw.example.com")
    monkeypatch.setenv("ALLOWED_HOSTS", "GW.example.com, other.example.com,,")
    monkeypatch.setenv("ALLOWED_ORIGINS", "https://App.example.com/ ,https://gw.example.com")
    monkeypatch.setenv("OKTA_AUDIENCE", "api://gateway, https://gw.example.com")
    settings = Settings(_env_file=None)
    assert settings.allowed_hosts == frozenset({"gw.example.com", "other.example.com"})
    assert settings.allowed_origins == frozenset({"https://app.example.com", "https://gw.example.com"})
    assert settings.audiences == ("api://gateway", "https://gw.example.com")


def test_settings_are_frozen() -> None:
    settings = Settings(_env_file=None)
    with pytest.raises(ValidationError):
        settings.GATEWAY_PORT = 1  # type: ignore[misc]


def test_client_secret_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OKTA_CLIENT_SECRET", "very-secret-value")
    settings = Settings(_env_file=None)
    assert settings.OKTA_CLIENT_SECRET is not None
    assert settings.OKTA_CLIENT_SECRET.get_secret_value() == "very-secret-value"
    assert "very-secret-value" not in repr(settings)
    assert "very-secret-value" not in str(settings)


# --- bad values -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["eighty", "-1", "65536", "80.5", ""])
def test_bad_gateway_port(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("GATEWAY_PORT", value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    assert [e["loc"] for e in caught.value.errors()] == [("GATEWAY_PORT",)]


def test_bad_gateway_port_in_dotenv_is_a_problem_named_after_the_variable(tmp_path: Path) -> None:
    env_file = _env_file(tmp_path, "GATEWAY_PORT=eighty\n")
    with pytest.raises(ConfigError) as caught:
        load(write_yaml(tmp_path, ""), env_file=env_file, environ={})
    assert {(p.path, p.severity) for p in caught.value.problems} == {("env GATEWAY_PORT", "error")}


def test_bad_port_is_reported_by_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "http")
    problems = problems_of(write_yaml(tmp_path, ""))
    assert {(p.path, p.severity) for p in problems} == {("env GATEWAY_PORT", "error")}


# --- loopback ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", [None, "", "0.0.0.0", "10.0.0.1", "example.com", "::", "128.0.0.1", "localhost.com"])
def test_non_loopback_hosts(host: str | None) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize("host", ["127.attacker.example", "127.0.0.1.nip.io"])
def test_dns_names_starting_with_127_are_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    ("base_url", "origin"),
    [("https://gw.example.com:443", "https://gw.example.com"), ("http://gw.example.com:80", "http://gw.example.com")],
)
def test_derived_origin_drops_the_default_port(monkeypatch: pytest.MonkeyPatch, base_url: str, origin: str) -> None:
    monkeypatch.setenv("GATEWAY_BASE_URL", base_url)
    assert origin in Settings(_env_file=None).allowed_origins
