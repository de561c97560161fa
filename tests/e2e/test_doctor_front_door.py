"""`okta-agent-proxy doctor` with `FRONT_DOOR=on`: its three checks of the gateway's own Okta app (DESIGN.md §8),
against the embedded Okta emulator on loopback.

The doctor runs on a thread, as in `test_doctor.py` (the console script in a subprocess for the correct app,
elsewhere the same `cli` in this process), while the emulator serves in the test's loop; assertions are on the exit
code, the stable markers (`✓`, `✗`, `!`, `○` + the check's name) and what the emulator received.
Where real Okta answers differently from the emulator (its sign-in redirect, its own error page), a middleware in
front of the emulator gives Okta's documented answer instead.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler

from okta_agent_proxy.config.settings import Settings
from okta_agent_proxy.devkit.okta_emulator import App, OktaEmulator
from okta_agent_proxy.keys import generate_rsa_key, load_signing_key, private_pem
from tests.support.backends import running_backend
from tests.support.cli_runner import logs_apart, run_cli_in_process
from tests.support.processes import free_port

GATEWAY_APP = "0oagateway0000000001"
SECRET = "gateway-app-Secret-never-printed-41c9"
WRONG_SECRET = "wrong-app-Secret-never-printed-77aa"
STATE_KEY = "state-encryption-key-for-doctor-tests-0123"
CHECKS = ("front door org metadata", "front door client auth", "front door redirect uri")
METADATA, CLIENT, REDIRECT = CHECKS
TIMEOUT = 60.0
CONSOLE_SCRIPT = Path(sys.executable).parent / "okta-agent-proxy"

pytestmark = pytest.mark.timeout(120)

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Outcome:
    code: int
    out: str

    def marks(self, mark: str) -> set[str]:
        """The check names printed with `mark` (✓, ✗, ! or ○)."""
        return {line[2:].split(": ", 1)[0] for line in self.out.splitlines() if line.startswith(f"{mark} ")}

    def fix(self, check: str) -> str:
        """The `fix:` line printed under the failed `check`."""
        lines = self.out.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(f"✗ {check}: "))
        return lines[at + 1].strip().removeprefix("fix: ")


@dataclass
class Authorize:
    """An aiohttp middleware before the emulator: `/oauth2/v1/authorize` gets `answer` when one is set."""

    answer: Answer | None = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.answer is not None and request.path == "/oauth2/v1/authorize":
            return await self.answer(request)
        return await handler(request)


@dataclass
class Setup:
    idp: OktaEmulator
    tmp_path: Path
    callback: str
    settings: dict[str, str]
    config: dict[str, Any]
    authorize: Authorize
    environ: dict[str, str] = field(default_factory=lambda: {"PSK_VALUE": "psk-for-the-doctor-front-door-tests"})

    async def doctor(self, *, in_subprocess: bool = False) -> Outcome:
        """`okta-agent-proxy doctor` on this setup, stdout and stderr together: in this process unless
        `in_subprocess` (the console script)."""
        config_path, env_path = self.tmp_path / "config.yaml", self.tmp_path / "test.env"
        config_path.write_text(yaml.safe_dump(self.config))
        env_path.write_text("".join(f"{name}={value}\n" for name, value in self.settings.items()))
        args = ["doctor", "--config", str(config_path), "--env-file", str(env_path), "--timeout", "3"]
        if in_subprocess:
            code, text = await self._subprocess(args)
        else:
            run = asyncio.to_thread(run_cli_in_process, args, env=self.environ, cwd=self.tmp_path)
            with logs_apart():  # the emulator's log lines are not the doctor's output
                result = await asyncio.wait_for(run, TIMEOUT)
            code, text = result.returncode, result.stdout + result.stderr
        assert SECRET not in text and WRONG_SECRET not in text
        assert "Traceback" not in text, text
        return Outcome(code, text)

    async def _subprocess(self, args: list[str]) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
        process = await asyncio.create_subprocess_exec(
            CONSOLE_SCRIPT,
            *args,
            cwd=self.tmp_path,
            env={**env, "PYTHONIOENCODING": "utf-8", **self.environ},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode()


def gateway_app(callback: str, **options: Any) -> App:
    return App(GATEWAY_APP, "Okta Agent Proxy", **{"client_secret": SECRET, "redirect_uris": (callback,), **options})


@asynccontextmanager
async def setup(tmp_path: Path, **app: Any) -> AsyncIterator[Setup]:
    """The emulator with the gateway's app (`app`: its options), a pre-shared-key backend, and settings that turn the
    front door on with a client secret."""
    base = f"http://127.0.0.1:{free_port()}"  # the gateway's address: nothing needs to listen there
    callback = f"{base}/oauth/callback"
    authorize = Authorize()
    async with (
        OktaEmulator(apps=[gateway_app(callback, **app)], middlewares=[authorize.middleware]) as idp,
        running_backend() as rb,
    ):
        config: dict[str, Any] = {
            "backends": {
                "tools": {
                    "url": f"http://127.0.0.1:{rb.port}/mcp",
                    "paths": ["/tools"],
                    "auth_method": "pre-shared-key",
                    "auth_config": {"key": "${PSK_VALUE}"},
                }
            },
            "agents": {"claude": {"client_id": "0oaclaude00000000001", "backend_access": ["tools"]}},
            "front_door": {"default_agent": "claude"},
        }
        settings = {
            "FRONT_DOOR": "on",
            "OKTA_DOMAIN": idp.base_url,
            "OKTA_CLIENT_ID": GATEWAY_APP,
            "OKTA_CLIENT_SECRET": SECRET,
            "STATE_ENCRYPTION_KEY": STATE_KEY,
            "GATEWAY_BASE_URL": base,
        }
        yield Setup(idp, tmp_path, callback, settings, config, authorize)


async def test_a_correct_app_passes_all_three(tmp_path: Path) -> None:
    async with setup(tmp_path, require_pkce=True) as s:
        outcome = await s.doctor(in_subprocess=True)
        assert outcome.code == 0, outcome.out
        assert set(CHECKS) <= outcome.marks("✓"), outcome.out
        assert s.idp.login.code_failures == {"invalid_grant": 1}  # the random code, after the secret was accepted
        assert s.idp.login.authorizations_started == 1  # the sign-in page was shown for the callback
        asked = s.idp.login.authorization_requests[-1]
        assert asked["redirect_uri"] == s.callback and asked["client_id"] == GATEWAY_APP
        assert asked["code_challenge_method"] == "S256" and asked["state"] and asked["nonce"]


async def test_private_key_jwt_credentials(tmp_path: Path) -> None:
    registered = private_pem(generate_rsa_key())
    async with setup(tmp_path, client_secret=None, public_jwk=load_signing_key(registered).public_jwk()) as s:
        del s.settings["OKTA_CLIENT_SECRET"]
        s.environ["OKTA_CLIENT_PRIVATE_KEY"] = registered  # a PEM: several lines, so not in the .env file
        outcome = await s.doctor()
        assert outcome.code == 0, outcome.out
        assert CLIENT in outcome.marks("✓"), outcome.out
        assert "private_key_jwt" in outcome.out

        unknown = private_pem(generate_rsa_key())
        s.environ["OKTA_CLIENT_PRIVATE_KEY"] = unknown  # a key Okta does not hold
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {CLIENT}, outcome.out
        assert "OKTA_CLIENT_PRIVATE_KEY" in outcome.fix(CLIENT)
        assert s.idp.login.code_failures == {"invalid_grant": 1, "invalid_client": 1}
        for pem in (registered, unknown):
            assert pem.splitlines()[1] not in outcome.out


async def test_a_wrong_secret_fails_the_client_check(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.settings["OKTA_CLIENT_SECRET"] = WRONG_SECRET
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {CLIENT}, outcome.out
        assert {METADATA, REDIRECT} <= outcome.marks("✓")
        assert "Okta refused the gateway's client credentials" in outcome.out
        assert "OKTA_CLIENT_SECRET" in outcome.fix(CLIENT)
        assert s.idp.login.code_failures == {"invalid_client": 1}


async def test_an_unknown_client_id_fails_the_client_and_redirect_checks(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.settings["OKTA_CLIENT_ID"] = "0oanotregistered0001"
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {CLIENT, REDIRECT}, outcome.out
        assert "OKTA_CLIENT_ID" in outcome.fix(REDIRECT)
        assert s.idp.login.authorization_errors == {"invalid_client": 1}


async def test_a_missing_redirect_uri_fails_the_redirect_check(tmp_path: Path) -> None:
    async with setup(tmp_path, redirect_uris=("https://elsewhere.example/oauth/callback",)) as s:
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert outcome.marks("✗") == {REDIRECT}, outcome.out
        assert {METADATA, CLIENT} <= outcome.marks("✓")
        assert s.callback in outcome.fix(REDIRECT) and "Sign-in redirect URI" in outcome.fix(REDIRECT)
        assert s.idp.login.authorization_errors == {"invalid_request": 1}  # the emulator's 400 page, not a redirect


# Okta's own answers where they differ from the emulator's: Classic Engine sends the browser to its sign-in page;
# for a redirect URI the app does not list it shows its 400 page, whose text is HTML-escaped and ends with a link to
# the app in the Admin Console (support.okta.com, "Okta Error 400 Bad Request"); once it trusts the redirect URI, a
# refusal goes back to it with `error`.
OKTA_ERROR_PAGE = (
    "<!DOCTYPE html><html><head><title>Error</title><script>var okta = {locale: 'en'};</script></head><body>"
    '<div class="content"><h2 class="o-form-title">400 Bad Request</h2>'
    "<p>The &#x27;redirect_uri&#x27; parameter must be a Login redirect URI in the client app settings: "
    "https://acme-admin.okta.com/admin/app/oidc_client/instance/0oagateway0000000001#tab-general</p></div>"
    "</body></html>"
)


async def sign_in_redirect(request: web.Request) -> web.StreamResponse:
    return web.Response(status=302, headers={"Location": "/login/login.htm?fromURI=%2Foauth2%2Fv1%2Fauthorize"})


async def okta_error_page(request: web.Request) -> web.StreamResponse:
    return web.Response(status=400, text=OKTA_ERROR_PAGE, content_type="text/html")


async def error_to_the_callback(request: web.Request) -> web.StreamResponse:
    query = "error=unsupported_response_type&error_description=The+response+type+is+not+supported&state=x"
    return web.Response(status=302, headers={"Location": f"{request.query['redirect_uri']}?{query}"})


@pytest.mark.parametrize(
    ("answer", "mark"),
    [(sign_in_redirect, "✓"), (okta_error_page, "✗"), (error_to_the_callback, "!")],
    ids=["sign-in redirect", "okta's 400 page", "error sent to the callback"],
)
async def test_okta_s_own_answers_to_the_sign_in(tmp_path: Path, answer: Answer, mark: str) -> None:
    async with setup(tmp_path) as s:
        s.authorize.answer = answer
        outcome = await s.doctor()
        assert REDIRECT in outcome.marks(mark), outcome.out
        assert outcome.code == (1 if mark == "✗" else 0), outcome.out
        if mark == "✗":
            assert s.callback in outcome.fix(REDIRECT)


async def test_okta_down_fails_the_metadata_and_skips_the_rest(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        await s.idp.close()
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert METADATA in outcome.marks("✗"), outcome.out
        assert {CLIENT, REDIRECT} <= outcome.marks("○"), outcome.out
        assert "OKTA_DOMAIN" in outcome.fix(METADATA)


@pytest.mark.parametrize("domain", ["{base}/oauth2/default", "http://localhost:{port}"], ids=["path", "alias"])
async def test_a_domain_that_is_not_the_org_s_fails_the_metadata(tmp_path: Path, domain: str) -> None:
    """A custom authorization server's issuer for the org's (the emulator serves its metadata, issuer and all), or
    another name of the org's host (its metadata names the org by its own)."""
    async with setup(tmp_path) as s:
        port = s.idp.base_url.rsplit(":", 1)[1]
        s.settings["OKTA_DOMAIN"] = domain.format(base=s.idp.base_url, port=port)
        outcome = await s.doctor()
        assert outcome.code == 1, outcome.out
        assert METADATA in outcome.marks("✗"), outcome.out
        assert {CLIENT, REDIRECT} <= outcome.marks("○"), outcome.out


async def test_front_door_off_shows_none_of_these_checks(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        s.settings["FRONT_DOOR"] = "off"
        outcome = await s.doctor()
        assert outcome.code == 0, outcome.out
        assert "front door" not in outcome.out
        assert len(s.idp.login.authorization_requests) == 0
        assert s.idp.login.code_failures == {}
