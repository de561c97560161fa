"""Cross App Access at the devkit Okta emulator, over real loopback HTTP (PROTOCOL.md §1–2).

Step 1 (RFC 8693 ID-JAG exchange at the org server) and step 2 (RFC 7523 jwt-bearer at a custom server) are driven
with real private_key_jwt client assertions built here with PyJWT; tokens are verified against the JWKS fetched from
the emulator. Every refusal is checked by its RFC 6749 error code and HTTP status, never by its wording."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import aiohttp
import jwt
import pytest
import structlog.testing
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from okta_agent_proxy.devkit.okta_emulator import ORG, App, AuthorizationServer, User, XaaPolicy
from tests.support.okta_faults import FaultyOktaEmulator

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

ADA = User("ada@example.com", "00uada0000000000001x")
GHOST = User("ghost@example.com", "00ughost000000000001")  # not in the directory
AGENT, AGENT_KID = "wlpgateway0000000001", "agent-key-1"
LONER, LONER_KID = "wlplonely00000000001", "loner-key-1"  # an agent no policy mentions
LINKED = "0oagatewaysso0000001"  # the agent's linked OIDC sign-on app
CURSOR = App("0oacursor00000000001", "Cursor")  # the MCP client whose users' tokens the agent exchanges
STRANGER = App("0oastranger000000001", "Not delegating")
TARGET = App("0oawikitarget0000001", "Gateway at the wiki", client_secret="wiki secret")
AGENT_SECRET = "agent secret"

GATEWAY_AS = "aus-gateway"  # issues the callers' tokens
JIRA, JIRA_AUDIENCE = "aus-jira", "api://jira"
JIRA_MCP, JIRA_OTHER_MCP = "https://jira.example.com/mcp", "https://jira.example.com/other-mcp"
WIKI, WIKI_AUDIENCE = "aus-wiki", "api://wiki"  # no declared resources, no default scopes; another client id
LEGACY = "aus-legacy"  # does not redeem ID-JAGs
ID_JAG_CLAIMS = {"iss", "sub", "aud", "client_id", "jti", "iat", "exp", "resource", "scope"}
ACCESS_CLAIMS = {"ver", "jti", "iss", "aud", "iat", "exp", "cid", "uid", "scp", "auth_time", "sub"}


@cache
def private_key(client_id: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def agent(client_id: str, kid: str, **options: Any) -> App:
    public: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(private_key(client_id).public_key()))
    return App(client_id, f"agent {client_id}", public_jwk={**public, "kid": kid}, **options)


def servers() -> list[AuthorizationServer]:
    jira_scopes = ("jira:read", "jira:write", "jira:admin")
    return [
        AuthorizationServer(GATEWAY_AS, "http://localhost:8000", scopes=("mcp:read",)),
        AuthorizationServer(JIRA, JIRA_AUDIENCE, jira_scopes, ("jira:read",), resources=(JIRA_MCP, JIRA_OTHER_MCP)),
        AuthorizationServer(WIKI, WIKI_AUDIENCE),
        AuthorizationServer(LEGACY, "api://legacy", jwt_bearer=False),
    ]


def policies() -> list[XaaPolicy]:
    jira = XaaPolicy(
        AGENT,
        JIRA,
        resources=(JIRA_MCP,),
        scopes=("jira:read", "jira:write"),
        delegating_client_ids=(CURSOR.client_id,),
    )
    wiki = XaaPolicy(AGENT, WIKI, delegating_client_ids=(CURSOR.client_id,), target_client_id=TARGET.client_id)
    return [jira, wiki, XaaPolicy(AGENT, LEGACY)]


def emulator(**options: Any) -> FaultyOktaEmulator:
    apps = [
        agent(AGENT, AGENT_KID, client_secret=AGENT_SECRET, linked_client_id=LINKED),
        agent(LONER, LONER_KID),
        CURSOR,
        STRANGER,
        TARGET,
    ]
    return FaultyOktaEmulator(auth_servers=servers(), users=[ADA], apps=apps, xaa_policies=policies(), **options)


def client_assertion(endpoint: str, client_id: str = AGENT, kid: str = AGENT_KID, **changes: Any) -> str:
    """private_key_jwt as Okta documents it: iss = sub = client_id, aud = the token endpoint URL, fresh jti, 5 min."""
    now = int(changes.pop("now", time.time()))
    claims = {"iss": client_id, "sub": client_id, "aud": endpoint, "iat": now, "exp": now + 300}
    claims |= {"jti": str(uuid.uuid4()), **changes}
    return jwt.encode(claims, private_key(client_id), algorithm="RS256", headers={"kid": kid})


def basic(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic (RFC 6749 §2.3.1; these ids and secrets need no form-encoding)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


@dataclass
class Xaa:
    """The emulator and an HTTP session, with the two steps as a client performs them."""

    idp: FaultyOktaEmulator
    http: aiohttp.ClientSession

    def caller_token(self, *, client: App = CURSOR, user: User = ADA, **options: Any) -> str:
        """A caller's access token from the gateway's authorization server, as the gateway receives it."""
        return self.idp.mint_access_token(
            GATEWAY_AS, user=user, client_id=client.client_id, scopes=["mcp:read"], **options
        )

    def exchange_form(
        self,
        subject_token: str | None = None,
        *,
        signer: str = AGENT,
        signer_kid: str = AGENT_KID,
        **changes: str | None,
    ) -> dict[str, str]:
        """A step 1 request with a client assertion by `signer` (the agent); `changes` override (None removes) form
        parameters."""
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": ID_JAG,
            "audience": self.idp.issuer(JIRA),
            "resource": JIRA_MCP,
            "scope": "jira:read jira:write",
            "subject_token": subject_token or self.caller_token(),
            "subject_token_type": ACCESS_TOKEN,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(self.idp.token_endpoint(ORG), signer, signer_kid),
        }
        return {name: value for name, value in {**form, **changes}.items() if value is not None}

    def redeem_form(self, id_jag: str, server: str = JIRA, **changes: str | None) -> dict[str, str]:
        """A step 2 request signed with the agent's key; `changes` override (None removes) form parameters."""
        form = {"grant_type": JWT_BEARER, "assertion": id_jag, "client_assertion_type": ASSERTION_TYPE}
        form["client_assertion"] = client_assertion(self.idp.token_endpoint(server))
        return {name: value for name, value in {**form, **changes}.items() if value is not None}

    async def post(
        self, server: str, form: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        async with self.http.post(self.idp.token_endpoint(server), data=dict(form), headers=headers) as response:
            return response.status, await response.json(), response.headers

    async def id_jag(self, **changes: Any) -> str:
        status, body, _ = await self.post(ORG, self.exchange_form(**changes))
        assert status == 200, body
        token: str = body["access_token"]
        return token

    async def verify(self, token: str, server: str, audience: str) -> dict[str, Any]:
        """Verify as a relying party: the JWKS from the server's metadata, the key by kid, RS256 only."""
        async with self.http.get(f"{self.idp.issuer(server)}/.well-known/oauth-authorization-server") as response:
            metadata = await response.json()
        async with self.http.get(metadata["jwks_uri"]) as response:
            jwks = jwt.PyJWKSet.from_dict(await response.json())
        key = {key.key_id: key for key in jwks.keys}[jwt.get_unverified_header(token)["kid"]]
        issuer = self.idp.issuer(server)
        claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], audience=audience, issuer=issuer)
        return claims


@pytest.fixture
async def xaa() -> AsyncIterator[Xaa]:
    async with emulator() as idp, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield Xaa(idp, http)


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, url
        return await response.json()


# ---- metadata


async def test_metadata_advertises_cross_app_access(xaa: Xaa) -> None:
    base = xaa.idp.base_url
    for document in ("oauth-authorization-server", "openid-configuration"):
        org = await get_json(xaa.http, f"{base}/.well-known/{document}")
        assert org["identity_chaining_requested_token_types_supported"] == [ID_JAG]
        assert org["grant_types_supported"] == [TOKEN_EXCHANGE]
        assert "authorization_grant_profiles_supported" not in org
        jira = await get_json(xaa.http, f"{xaa.idp.issuer(JIRA)}/.well-known/{document}")
        assert jira["grant_types_supported"] == ["client_credentials", JWT_BEARER]
        assert jira["authorization_grant_profiles_supported"] == ["urn:ietf:params:oauth:grant-profile:id-jag"]
        assert "identity_chaining_requested_token_types_supported" not in jira
        legacy = await get_json(xaa.http, f"{xaa.idp.issuer(LEGACY)}/.well-known/{document}")
        assert legacy["grant_types_supported"] == ["client_credentials"]
        assert "authorization_grant_profiles_supported" not in legacy


async def test_an_org_without_token_exchange(xaa: Xaa) -> None:
    async with emulator(token_exchange=False) as idp:
        org = await get_json(xaa.http, f"{idp.base_url}/.well-known/oauth-authorization-server")
        assert org["grant_types_supported"] == []
        assert "identity_chaining_requested_token_types_supported" not in org
        status, body, _ = await Xaa(idp, xaa.http).post(ORG, Xaa(idp, xaa.http).exchange_form())
        assert (status, body["error"]) == (400, "unsupported_grant_type")
        assert idp.xaa.id_jag_failures == {"unsupported_grant_type": 1}


# ---- the happy paths


async def test_access_token_subject_end_to_end(xaa: Xaa) -> None:
    idp = xaa.idp
    status, body, headers = await xaa.post(ORG, xaa.exchange_form())
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in", "scope"}
    assert (body["issued_token_type"], body["token_type"], body["expires_in"]) == (ID_JAG, "N_A", 300)
    assert body["scope"] == "jira:read jira:write"
    assert "refresh_token" not in body

    id_jag = body["access_token"]
    assert jwt.get_unverified_header(id_jag) == {"alg": "RS256", "kid": idp.signing_kid(ORG), "typ": "oauth-id-jag+jwt"}
    claims = await xaa.verify(id_jag, ORG, idp.issuer(JIRA))
    assert set(claims) == ID_JAG_CLAIMS
    assert (claims["iss"], claims["sub"], claims["aud"]) == (idp.base_url, ADA.uid, idp.issuer(JIRA))
    assert (claims["client_id"], claims["resource"], claims["scope"]) == (AGENT, JIRA_MCP, "jira:read jira:write")
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 60
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16

    status, body, headers = await xaa.post(JIRA, xaa.redeem_form(id_jag))
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert set(body) == {"token_type", "expires_in", "access_token", "scope"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 3600, "jira:read jira:write")
    access = await xaa.verify(body["access_token"], JIRA, JIRA_MCP)  # aud = the ID-JAG's resource
    assert set(access) == ACCESS_CLAIMS
    assert (access["iss"], access["aud"], access["cid"]) == (idp.issuer(JIRA), JIRA_MCP, AGENT)
    assert (access["sub"], access["uid"], access["ver"]) == (ADA.login, ADA.uid, 1)
    assert access["scp"] == ["jira:read", "jira:write"]
    assert access["exp"] - access["iat"] == 3600
    assert access["jti"].startswith("AT.")

    assert (idp.xaa.id_jag_exchanges, idp.xaa.jwt_bearer_grants) == (1, 1)
    assert not idp.xaa.id_jag_failures and not idp.xaa.jwt_bearer_failures
    assert (idp.token_requests[ORG], idp.token_requests[JIRA]) == (1, 1)


@pytest.mark.parametrize(("issuer", "audience"), [(ORG, LINKED), (ORG, AGENT), (GATEWAY_AS, LINKED)])
async def test_id_token_subject(xaa: Xaa, issuer: str, audience: str) -> None:
    id_token = xaa.idp.mint_id_token(issuer, user=ADA, client_id=audience)
    id_jag = await xaa.id_jag(subject_token=id_token, subject_token_type=ID_TOKEN, resource=None, scope="jira:read")
    claims = await xaa.verify(id_jag, ORG, xaa.idp.issuer(JIRA))
    assert set(claims) == ID_JAG_CLAIMS - {"resource"}
    assert (claims["sub"], claims["client_id"], claims["scope"]) == (ADA.uid, AGENT, "jira:read")
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))
    assert status == 200, body
    access = await xaa.verify(body["access_token"], JIRA, JIRA_AUDIENCE)  # no resource: the server's audience
    assert (access["aud"], access["sub"], access["scp"]) == (JIRA_AUDIENCE, ADA.login, ["jira:read"])


async def test_the_agents_own_access_token_needs_no_delegation(xaa: Xaa) -> None:
    own = xaa.idp.mint_access_token(GATEWAY_AS, user=ADA, client_id=AGENT, scopes=["mcp:read"])
    assert await xaa.id_jag(subject_token=own)


async def test_target_client_id_and_client_secret_basic_at_the_target(xaa: Xaa) -> None:
    idp = xaa.idp
    resource = "https://wiki.example.com/mcp"  # the wiki server declares no resources: any is accepted
    id_jag = await xaa.id_jag(audience=idp.issuer(WIKI), resource=resource, scope="wiki:read")
    assert jwt.decode(id_jag, options={"verify_signature": False})["client_id"] == TARGET.client_id
    # The agent's own key is not the client the ID-JAG names.
    status, body, _ = await xaa.post(WIKI, xaa.redeem_form(id_jag, WIKI))
    assert (status, body["error"]) == (400, "invalid_grant")
    form = {"grant_type": JWT_BEARER, "assertion": id_jag}
    status, body, _ = await xaa.post(WIKI, form, basic(TARGET.client_id, "wiki secret"))
    assert status == 200, body
    access = await xaa.verify(body["access_token"], WIKI, resource)
    assert (access["cid"], access["aud"], access["scp"]) == (TARGET.client_id, resource, ["wiki:read"])


# ---- step 1: scopes and policy


@pytest.mark.parametrize(
    ("changes", "scope"),
    [
        ({"scope": "jira:read jira:admin"}, "jira:read"),  # narrowed to what the policy allows
        ({"scope": "jira:write jira:write"}, "jira:write"),
        ({"scope": None}, "jira:read jira:write"),  # none requested: the policy's scopes
    ],
)
async def test_exchange_scopes(xaa: Xaa, changes: dict[str, Any], scope: str) -> None:
    status, body, _ = await xaa.post(ORG, xaa.exchange_form(**changes))
    assert (status, body["scope"]) == (200, scope), body
    assert jwt.decode(body["access_token"], options={"verify_signature": False})["scope"] == scope


async def test_policies_can_change_while_running(xaa: Xaa) -> None:
    xaa.idp.xaa.policies.clear()
    status, body, _ = await xaa.post(ORG, xaa.exchange_form())
    assert (status, body["error"]) == (400, "access_denied")
    # By issuer URL, any resource or scope; the delegation link is still needed for Cursor's token.
    xaa.idp.xaa.policies.append(XaaPolicy(AGENT, xaa.idp.issuer(JIRA)))
    status, body, _ = await xaa.post(ORG, xaa.exchange_form())
    assert (status, body["error"]) == (400, "access_denied")
    xaa.idp.xaa.policies.append(XaaPolicy(AGENT, xaa.idp.issuer(JIRA), delegating_client_ids=(CURSOR.client_id,)))
    status, body, _ = await xaa.post(ORG, xaa.exchange_form(resource=JIRA_OTHER_MCP, scope="jira:admin"))
    assert status == 200, body
    assert xaa.idp.xaa.id_jag_exchanges == 1
    assert xaa.idp.xaa.id_jag_failures == {"access_denied": 2}


def forged_subject(x: Xaa) -> str:
    """A caller token claiming the gateway server's kid, signed by another key."""
    claims = jwt.decode(x.caller_token(), options={"verify_signature": False})
    stranger = private_key("stranger")
    return jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": x.idp.signing_kid(GATEWAY_AS)})


def tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload}.{signature[:-4]}AAAA"


Case = Callable[[Xaa], tuple[dict[str, str], dict[str, str] | None]]


def form(**changes: Any) -> Case:
    """A step 1 request with these changes; a callable value gets the Xaa (for tokens needing the running idp)."""
    return lambda x: (x.exchange_form(**{k: v(x) if callable(v) else v for k, v in changes.items()}), None)


def secret_post(x: Xaa) -> tuple[dict[str, str], dict[str, str] | None]:
    no_assertion = x.exchange_form(client_assertion_type=None, client_assertion=None)
    return no_assertion | {"client_id": AGENT, "client_secret": AGENT_SECRET}, None


def secret_basic(x: Xaa) -> tuple[dict[str, str], dict[str, str] | None]:
    return x.exchange_form(client_assertion_type=None, client_assertion=None), basic(AGENT, AGENT_SECRET)


def foreign_issuer_token(x: Xaa) -> str:
    claims = {"iss": "https://evil.example", "sub": ADA.login, "uid": ADA.uid, "exp": int(time.time()) + 60}
    return jwt.encode(claims, private_key("stranger"), algorithm="RS256", headers={"kid": "evil"})


def org_access_token(x: Xaa) -> str:
    return x.idp.mint_access_token(ORG, user=ADA, client_id=CURSOR.client_id, scopes=[])


def client_credentials_token(x: Xaa) -> str:
    return x.idp.mint_access_token(GATEWAY_AS, user=None, client_id=CURSOR.client_id, scopes=[])


def id_token(client_id: str, lifetime: int = 3600, **claims: Any) -> Callable[[Xaa], str]:
    return lambda x: x.idp.mint_id_token(ORG, user=ADA, client_id=client_id, lifetime=lifetime, extra_claims=claims)


def wiki(x: Xaa) -> str:
    return x.idp.issuer(WIKI)


def without(name: str) -> Case:
    return lambda x: ({key: value for key, value in x.exchange_form().items() if key != name}, None)


STEP1_REFUSALS: dict[str, tuple[Case, int, str]] = {
    # client authentication: agents must use private_key_jwt
    "client_secret_post": (secret_post, 401, "invalid_client"),
    "client_secret_basic": (secret_basic, 401, "invalid_client"),
    "assertion_with_wrong_kid": (form(signer_kid="another-kid"), 401, "invalid_client"),
    # malformed requests
    "no_requested_token_type": (form(requested_token_type=None), 400, "invalid_request"),
    "requested_access_token": (form(requested_token_type=ACCESS_TOKEN), 400, "invalid_request"),
    "no_subject_token": (without("subject_token"), 400, "invalid_request"),
    "no_subject_token_type": (form(subject_token_type=None), 400, "invalid_request"),
    "saml_subject": (form(subject_token_type="urn:ietf:params:oauth:token-type:saml2"), 400, "invalid_request"),
    "no_audience": (form(audience=None), 400, "invalid_request"),
    # audience and resource
    "unknown_audience": (form(audience="https://elsewhere.example/oauth2/aus-x"), 400, "invalid_target"),
    "audience_is_a_server_id": (form(audience=JIRA), 400, "invalid_target"),
    "audience_is_the_org": (form(audience=lambda x: x.idp.base_url), 400, "invalid_target"),
    "audience_is_a_token_url": (form(audience=lambda x: x.idp.token_endpoint(JIRA)), 400, "invalid_target"),
    "audience_without_jwt_bearer": (form(audience=lambda x: x.idp.issuer(LEGACY)), 400, "invalid_target"),
    "unregistered_resource": (form(resource="https://jira.example.com/nope"), 400, "invalid_target"),
    "resource_with_fragment": (form(audience=wiki, resource="https://w.example/#f"), 400, "invalid_target"),
    "relative_resource": (form(audience=wiki, resource="/mcp"), 400, "invalid_target"),
    # scopes
    "openid_scope": (form(scope="openid"), 400, "invalid_scope"),
    "profile_among_scopes": (form(scope="jira:read profile"), 400, "invalid_scope"),
    "undefined_scope": (form(scope="jira:read jira:nope"), 400, "invalid_scope"),
    "no_scope_and_no_defaults": (form(audience=wiki, resource=None, scope=None), 400, "invalid_scope"),
    # the subject token
    "expired_subject": (form(subject_token=lambda x: x.caller_token(lifetime=-300)), 400, "invalid_grant"),
    "forged_subject": (form(subject_token=forged_subject), 400, "invalid_grant"),
    "tampered_subject": (form(subject_token=lambda x: tampered(x.caller_token())), 400, "invalid_grant"),
    "garbage_subject": (form(subject_token="not-a-jwt"), 400, "invalid_grant"),
    "subject_from_another_issuer": (form(subject_token=foreign_issuer_token), 400, "invalid_grant"),
    "org_access_token": (form(subject_token=org_access_token), 400, "invalid_grant"),
    "unknown_user": (form(subject_token=lambda x: x.caller_token(user=GHOST)), 400, "invalid_grant"),
    "client_credentials_subject": (form(subject_token=client_credentials_token), 400, "invalid_grant"),
    "access_token_as_id_token": (form(subject_token_type=ID_TOKEN), 400, "invalid_grant"),
    "id_token_as_access_token": (form(subject_token=id_token(AGENT)), 400, "invalid_grant"),
    "id_token_for_another_app": (
        form(subject_token=id_token(CURSOR.client_id), subject_token_type=ID_TOKEN),
        400,
        "invalid_grant",
    ),
    "id_token_with_an_object_aud": (
        form(subject_token=id_token(AGENT, aud=[{}]), subject_token_type=ID_TOKEN),
        400,
        "invalid_grant",
    ),
    "expired_id_token": (form(subject_token=id_token(LINKED, -300), subject_token_type=ID_TOKEN), 400, "invalid_grant"),
    # policy
    "no_delegation_link": (form(subject_token=lambda x: x.caller_token(client=STRANGER)), 400, "access_denied"),
    "agent_without_policy": (form(signer=LONER, signer_kid=LONER_KID), 400, "access_denied"),
    "resource_outside_the_policy": (form(resource=JIRA_OTHER_MCP), 400, "access_denied"),
    "scopes_outside_the_policy": (form(scope="jira:admin"), 400, "access_denied"),
}


@pytest.mark.parametrize("case", sorted(STEP1_REFUSALS))
async def test_exchange_refusals(xaa: Xaa, case: str) -> None:
    build, expected_status, error = STEP1_REFUSALS[case]
    request_form, headers = build(xaa)
    status, body, response_headers = await xaa.post(ORG, request_form, headers)
    assert (status, body["error"]) == (expected_status, error), body
    assert response_headers["Cache-Control"] == "no-store"
    assert "access_token" not in body
    assert (xaa.idp.xaa.id_jag_exchanges, xaa.idp.xaa.id_jag_failures) == (0, {error: 1})


async def test_a_rotated_out_subject_key_is_refused(xaa: Xaa) -> None:
    token = xaa.caller_token()
    xaa.idp.rotate_keys(GATEWAY_AS, keep_old=False)
    status, body, _ = await xaa.post(ORG, xaa.exchange_form(token))
    assert (status, body["error"]) == (400, "invalid_grant")
    assert await xaa.id_jag(subject_token=xaa.caller_token())  # a token under the new key works


# ---- step 2


def id_jag_claims(x: Xaa) -> dict[str, Any]:
    return {"iss": x.idp.base_url, "aud": x.idp.issuer(JIRA), "client_id": AGENT}


def minted(**changes: Any) -> Callable[[Xaa], str]:
    """An ID-JAG minted by the org with these claim changes (a callable value gets the Xaa); `headers=` too."""

    def mint(x: Xaa) -> str:
        headers = changes.get("headers")
        claims = {k: v(x) if callable(v) else v for k, v in changes.items() if k not in ("headers", "lifetime")}
        scopes = ["jira:read", "jira:write"]
        lifetime = changes.get("lifetime", 300)
        return x.idp.xaa.mint_id_jag(
            JIRA,
            user=ADA.login,
            client_id=AGENT,
            scopes=scopes,
            resource=JIRA_MCP,
            lifetime=lifetime,
            extra_claims=claims,
            headers=headers,
        )

    return mint


def unsigned_id_jag(x: Xaa) -> str:
    claims = jwt.decode(minted()(x), options={"verify_signature": False})
    return jwt.encode(claims, "", algorithm="none", headers={"typ": "oauth-id-jag+jwt"})


def foreign_signed_id_jag(x: Xaa) -> str:
    claims = jwt.decode(minted()(x), options={"verify_signature": False})
    headers = {"typ": "oauth-id-jag+jwt", "kid": x.idp.signing_kid(ORG)}
    return jwt.encode(claims, private_key("stranger"), algorithm="RS256", headers=headers)


def jira_signed_id_jag(x: Xaa) -> str:
    """Signed by the custom server's own key and naming it as issuer: an ID-JAG must come from the org."""
    claims = jwt.decode(minted()(x), options={"verify_signature": False}) | {"iss": x.idp.issuer(JIRA)}
    typ = {"typ": "oauth-id-jag+jwt"}
    return x.idp.mint_access_token(JIRA, user=ADA, client_id=AGENT, scopes=[], extra_claims=claims, headers=typ)


STEP2_REFUSALS: dict[str, tuple[Callable[[Xaa], str], str]] = {
    "typ_missing": (minted(headers={"typ": None}), "invalid_grant"),
    "typ_jwt": (minted(headers={"typ": "JWT"}), "invalid_grant"),
    "alg_none": (unsigned_id_jag, "invalid_grant"),
    "signed_by_a_stranger": (foreign_signed_id_jag, "invalid_grant"),
    "issued_by_the_custom_server": (jira_signed_id_jag, "invalid_grant"),
    "iss_not_the_org": (minted(iss="https://evil.example"), "invalid_grant"),
    "aud_another_server": (minted(aud=lambda x: x.idp.issuer(WIKI)), "invalid_grant"),
    "aud_two_values": (minted(aud=lambda x: [x.idp.issuer(JIRA), x.idp.issuer(WIKI)]), "invalid_grant"),
    "aud_the_audience_not_the_issuer": (minted(aud=JIRA_AUDIENCE), "invalid_grant"),
    "client_id_another_client": (minted(client_id=CURSOR.client_id), "invalid_grant"),
    "client_id_missing": (minted(client_id=None), "invalid_grant"),
    "expired": (minted(lifetime=-120), "invalid_grant"),
    "exp_missing": (minted(exp=None), "invalid_grant"),
    "iat_in_the_future": (minted(iat=int(time.time()) + 3600), "invalid_grant"),
    "iat_missing": (minted(iat=None), "invalid_grant"),
    "jti_missing": (minted(jti=None), "invalid_grant"),
    "unknown_subject": (minted(sub=GHOST.uid), "invalid_grant"),
    "subject_by_login": (minted(sub=ADA.login), "invalid_grant"),
    "undeclared_resource": (minted(resource="https://elsewhere.example/mcp"), "invalid_grant"),
    "one_undeclared_resource": (minted(resource=[JIRA_MCP, "https://elsewhere.example/mcp"]), "invalid_grant"),
    "scope_not_a_string": (minted(scope=["jira:read"]), "invalid_grant"),
    "no_scope": (minted(scope=None), "invalid_scope"),
    "only_undefined_scopes": (minted(scope="other:read"), "invalid_scope"),
    "not_a_jwt": (lambda x: "not-a-jwt", "invalid_grant"),
}


@pytest.mark.parametrize("case", sorted(STEP2_REFUSALS))
async def test_jwt_bearer_refusals(xaa: Xaa, case: str) -> None:
    build, error = STEP2_REFUSALS[case]
    status, body, headers = await xaa.post(JIRA, xaa.redeem_form(build(xaa)))
    assert (status, body["error"]) == (400, error), body
    assert headers["Cache-Control"] == "no-store"
    assert (xaa.idp.xaa.jwt_bearer_grants, xaa.idp.xaa.jwt_bearer_failures) == (0, {error: 1})


async def test_a_minted_id_jag_with_a_one_element_aud_array_is_accepted(xaa: Xaa) -> None:
    id_jag = minted(aud=lambda x: [x.idp.issuer(JIRA)], resource=[JIRA_MCP])(xaa)
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))
    assert status == 200, body
    assert (await xaa.verify(body["access_token"], JIRA, JIRA_MCP))["aud"] == JIRA_MCP


@pytest.mark.parametrize(
    ("server", "form_changes", "status", "error"),
    [
        (JIRA, {"assertion": None}, 400, "invalid_request"),
        (JIRA, {"client_assertion": "not-a-jwt"}, 401, "invalid_client"),
        (LEGACY, {}, 400, "unsupported_grant_type"),  # a server that does not redeem ID-JAGs
        (ORG, {}, 400, "unsupported_grant_type"),  # the org never redeems the ID-JAGs it issues
    ],
)
async def test_jwt_bearer_request_refusals(
    xaa: Xaa, server: str, form_changes: dict[str, str | None], status: int, error: str
) -> None:
    id_jag = await xaa.id_jag()
    response_status, body, _ = await xaa.post(server, xaa.redeem_form(id_jag, server, **form_changes))
    assert (response_status, body["error"]) == (status, error)
    if server != ORG:
        assert xaa.idp.xaa.jwt_bearer_failures == {error: 1}


async def test_an_id_jag_is_single_use(xaa: Xaa) -> None:
    id_jag = await xaa.id_jag()
    # A refusal for another reason does not use it up.
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag, scope="jira:admin"))
    assert (status, body["error"]) == (400, "invalid_scope")
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))
    assert status == 200, body
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))
    assert (status, body["error"]) == (400, "invalid_grant")
    assert xaa.idp.xaa.jwt_bearer_grants == 1
    assert xaa.idp.xaa.jwt_bearer_failures == {"invalid_scope": 1, "invalid_grant": 1}
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(await xaa.id_jag()))  # a fresh ID-JAG works
    assert status == 200, body


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        (None, ["jira:read", "jira:write"]),  # all the ID-JAG grants
        ("jira:write jira:admin", ["jira:write"]),  # requested ∩ ID-JAG
        ("jira:write jira:read", ["jira:write", "jira:read"]),
    ],
)
async def test_jwt_bearer_scopes_are_intersected(xaa: Xaa, requested: str | None, granted: list[str]) -> None:
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(await xaa.id_jag(), scope=requested))
    assert (status, body["scope"]) == (200, " ".join(granted)), body
    assert (await xaa.verify(body["access_token"], JIRA, JIRA_MCP))["scp"] == granted


async def test_scopes_the_server_does_not_define_are_dropped(xaa: Xaa) -> None:
    id_jag = minted(scope="jira:read other:thing")(xaa)
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))
    assert (status, body["scope"]) == (200, "jira:read"), body


async def test_an_expired_id_jag_by_the_emulator_clock() -> None:
    now = [time.time()]
    async with emulator(clock=lambda: now[0]) as idp, aiohttp.ClientSession() as http:
        x = Xaa(idp, http)
        id_jag = await x.id_jag()
        now[0] += 300 + 61  # past exp and the skew
        form = x.redeem_form(id_jag, client_assertion=client_assertion(idp.token_endpoint(JIRA), now=now[0]))
        status, body, _ = await x.post(JIRA, form)
        assert (status, body["error"]) == (400, "invalid_grant")


# ---- token endpoint failure injection


async def test_token_endpoint_down_and_recovery(xaa: Xaa) -> None:
    idp = xaa.idp
    idp.set_token_endpoint_mode("down")
    async with xaa.http.post(idp.token_endpoint(ORG), data=xaa.exchange_form()) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    id_jag_form = xaa.exchange_form()
    idp.set_token_endpoint_mode("ok")
    id_jag = await xaa.id_jag()
    idp.set_token_endpoint_mode("down", auth_server_id=JIRA)  # only step 2 is down
    async with xaa.http.post(idp.token_endpoint(JIRA), data=xaa.redeem_form(id_jag)) as response:
        assert response.status == 503
    status, _, _ = await xaa.post(ORG, id_jag_form)
    assert status == 200
    idp.set_token_endpoint_mode("ok", auth_server_id=JIRA)
    status, body, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))  # the outage did not consume the ID-JAG
    assert status == 200, body
    assert (idp.xaa.id_jag_exchanges, idp.xaa.jwt_bearer_grants) == (2, 1)
    assert (idp.token_requests[ORG], idp.token_requests[JIRA]) == (3, 2)
    with pytest.raises(ValueError, match="mode"):
        idp.set_token_endpoint_mode("garbage")  # type: ignore[arg-type]


async def test_token_endpoint_slow(xaa: Xaa) -> None:
    idp = xaa.idp
    idp.set_token_endpoint_mode("slow", delay_seconds=0.5, auth_server_id=ORG)
    with pytest.raises(TimeoutError):
        async with xaa.http.post(
            idp.token_endpoint(ORG), data=xaa.exchange_form(), timeout=aiohttp.ClientTimeout(total=0.1)
        ):
            pass
    started = time.monotonic()
    id_jag = await xaa.id_jag()
    assert time.monotonic() - started >= 0.45
    started = time.monotonic()
    status, _, _ = await xaa.post(JIRA, xaa.redeem_form(id_jag))  # other servers answer at once
    assert status == 200
    assert time.monotonic() - started < 0.45


async def test_close_does_not_wait_for_a_slow_token_answer() -> None:
    idp = emulator(token_delay_seconds=60)
    await idp.start()
    async with aiohttp.ClientSession() as http:
        idp.set_token_endpoint_mode("slow")
        pending = asyncio.ensure_future(http.post(idp.token_endpoint(ORG), data={"grant_type": TOKEN_EXCHANGE}))
        async with asyncio.timeout(10):
            while not idp.token_requests[ORG]:
                await asyncio.sleep(0.01)
            await idp.close()
        with pytest.raises(aiohttp.ClientError):
            (await pending).close()


# ---- logs


async def test_logs_carry_no_token_or_assertion(xaa: Xaa) -> None:
    with structlog.testing.capture_logs() as events:
        async with emulator() as idp:
            x = Xaa(idp, xaa.http)
            subject = x.caller_token()
            step1 = x.exchange_form(subject)
            status, body, _ = await x.post(ORG, step1)
            id_jag = body["access_token"]
            step2 = x.redeem_form(id_jag)
            status, body, _ = await x.post(JIRA, step2)
            assert status == 200
            _, refused, _ = await x.post(JIRA, step2)  # replayed
            assert refused["error"] == "invalid_client"  # the client assertion's jti, checked first
    logged = repr(events)
    assert "okta_emulator_token_issued" in logged and "okta_emulator_token_refused" in logged
    for secret in (subject, id_jag, body["access_token"], step1["client_assertion"], step2["client_assertion"]):
        assert secret not in logged
        assert secret.split(".")[2] not in logged
