"""Cross App Access (ID-JAG) for the Okta emulator: the two grants and the policy behind them (PROTOCOL.md §1–2).

- **Step 1**, at the org server's `/oauth2/v1/token`: the RFC 8693 token exchange with
  `requested_token_type=…:token-type:id-jag`. An AI agent (`wlp…`) must have authenticated with `private_key_jwt`, as
  Okta requires; an OIDC app (the "requesting app" of Okta's Cross App Access, such as the gateway's own web app) may
  use its client secret too (the requesting app sends `client_id` + `client_secret` to Okta's `/oauth2/v1/token` in
  auth0.com/docs/secure/call-apis-on-users-behalf/xaa/end-to-end-testing). `audience` is the issuer of a custom
  server that redeems ID-JAGs, `resource` one of its `resources` (when it declares any), `scope` custom scopes it
  defines. The subject token is a user's access token from one of the custom servers (its client must be the agent,
  or delegate to it: `XaaPolicy`), or an ID token signed by the org server (as its sign-in issues them:
  `okta_emulator_login.py`) or a custom server whose `aud` is the requesting client or the app it is linked to; its
  user must be a configured one. An `XaaPolicy` must allow the client, audience, resource and scopes; the ID-JAG
  carries the scopes it allows.
- **Step 2**, at a custom server's `{issuer}/v1/token`: the RFC 7523 jwt-bearer grant with `assertion=<ID-JAG>`,
  checked as PROTOCOL.md §1.5 says; the access token is Okta-shaped, for the ID-JAG's user, with `aud` = the
  ID-JAG's `resource` (else the server's audience) and `scp` = requested ∩ ID-JAG ∩ server scopes.

Subjects: an ID-JAG's `sub` is the user's Okta id (`uid`), as in Okta's examples and in its ID tokens; step 2 maps it
back to the user, so the access token has `sub` = login and `uid` = that id, like any Okta user token.

Errors (RFC 6749 §5.2), step 1: a missing or unsupported parameter `invalid_request`; an AI agent authenticated by
client secret `invalid_client`; an unknown audience or a refused resource `invalid_target`; OIDC or undefined scopes
`invalid_scope`; a bad, expired or foreign subject token `invalid_grant`; no matching policy `access_denied`. Step 2:
every assertion defect (typ, signature, iss, aud, client_id, exp, iat, jti replay, user, resource) `invalid_grant`,
an empty scope intersection `invalid_scope`.

Not emulated: SAML and refresh-token subjects, `authorization_details`, `actor_token`, machine (client-credentials)
subjects, the subject access token's `aud` check, step-up (`insufficient_user_authentication`), DPoP (`cnf.jkt`).
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from okta_agent_proxy.devkit.okta_emulator_clients import CLOCK_SKEW_SECONDS
from okta_agent_proxy.devkit.okta_emulator_directory import OIDC_SCOPES, ORG, AuthorizationServer, User
from okta_agent_proxy.devkit.okta_emulator_keys import KeyRing
from okta_agent_proxy.devkit.okta_emulator_oauth import OAuthError, TokenRequest

__all__ = [
    "ACCESS_TOKEN_LIFETIME_SECONDS",
    "ACCESS_TOKEN_TYPE",
    "ID_JAG_GRANT_PROFILE",
    "ID_JAG_LIFETIME_SECONDS",
    "ID_JAG_TOKEN_TYPE",
    "ID_JAG_TYP",
    "ID_TOKEN_TYPE",
    "JWT_BEARER",
    "TOKEN_EXCHANGE",
    "CrossAppAccess",
    "XaaPolicy",
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id-jag"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ID_JAG_TYP = "oauth-id-jag+jwt"
ID_JAG_GRANT_PROFILE = "urn:ietf:params:oauth:grant-profile:id-jag"
ID_JAG_LIFETIME_SECONDS = 300
ACCESS_TOKEN_LIFETIME_SECONDS = 3600
_ALGORITHMS = ("RS256", "RS384", "RS512")  # what the emulator's servers sign with; never "none"
_JWS = jwt.PyJWS()  # signatures only: claims are checked here, against the emulator's clock


@dataclass(frozen=True)
class XaaPolicy:
    """Okta's resource connection (and delegation link): `agent_client_id` may get ID-JAGs for `audience`.

    `audience`: the custom authorization server, by id (`aus-…`) or issuer URL. `resources`: the `resource` values
    allowed (empty: any the server accepts; a request without `resource` always matches). `scopes`: the scopes
    allowed; requested scopes are narrowed to them (no overlap: no match), and a request without `scope` gets them
    (empty: any scope the server defines, and its default scopes). `delegating_client_ids`: clients whose users'
    access tokens the agent may exchange, besides its own. `target_client_id`: the agent's client id at the target
    server, the ID-JAG's `client_id` (default: the agent's own).
    """

    agent_client_id: str
    audience: str
    resources: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    delegating_client_ids: tuple[str, ...] = ()
    target_client_id: str | None = None


@dataclass(frozen=True)
class _Subject:
    user: User
    client_id: str | None  # the subject access token's `cid`; None for an ID token


class CrossAppAccess:
    """The emulator's Cross App Access (`OktaEmulator.xaa`): the ID-JAG exchange (`exchange`, at the org server) and
    the jwt-bearer grant (`redeem`, at custom servers), their `policies`, counters and metadata."""

    def __init__(
        self,
        servers: Mapping[str, AuthorizationServer],
        users: Mapping[str, User],
        issuer: Callable[[str], str],
        keyring: Callable[[str], KeyRing],
        mint_access_token: Callable[..., str],
        clock: Callable[[], float],
        policies: Iterable[XaaPolicy] = (),
    ) -> None:
        """`servers` by id, `users` by login, and the emulator's `issuer`, `keyring`, `mint_access_token`, clock."""
        self._servers = servers
        self._users_by_login = users
        self._users = {user.uid: user for user in users.values()}
        self._issuer = issuer
        self._keyring = keyring
        self._mint_access_token = mint_access_token
        self._clock = clock
        self._used_jtis: dict[tuple[str, str], float] = {}  # (iss, jti) of redeemed ID-JAGs → their exp
        self.policies: list[XaaPolicy] = list(policies)
        """Which agent may get ID-JAGs for what (the first match wins); read on every request: tests may change it."""
        self.id_jag_exchanges = 0
        """ID-JAGs issued by the org server (step 1 successes)."""
        self.jwt_bearer_grants = 0
        """Access tokens issued for ID-JAGs by custom servers (step 2 successes)."""
        self.id_jag_failures: Counter[str] = Counter()
        """Refused token exchanges at the org server by error code, client authentication failures included."""
        self.jwt_bearer_failures: Counter[str] = Counter()
        """Refused jwt-bearer grants at custom servers by error code, client authentication failures included."""

    def count(self, auth_server_id: str, grant_type: str | None, error: str | None) -> None:
        """Count a `/v1/token` outcome (`error` None: success); only Cross App Access grants are counted."""
        if auth_server_id == ORG and grant_type == TOKEN_EXCHANGE:
            self.id_jag_exchanges += error is None
            self.id_jag_failures.update([error] if error else [])
        elif auth_server_id != ORG and grant_type == JWT_BEARER:
            self.jwt_bearer_grants += error is None
            self.jwt_bearer_failures.update([error] if error else [])

    @staticmethod
    def metadata(auth_server_id: str, grant_types: Iterable[str]) -> dict[str, Any]:
        """The RFC 8414 members that advertise Cross App Access at a server serving `grant_types`."""
        if auth_server_id == ORG and TOKEN_EXCHANGE in grant_types:
            return {"identity_chaining_requested_token_types_supported": [ID_JAG_TOKEN_TYPE]}
        if auth_server_id != ORG and JWT_BEARER in grant_types:
            return {"authorization_grant_profiles_supported": [ID_JAG_GRANT_PROFILE]}
        return {}

    def mint_id_jag(
        self,
        auth_server_id: str,
        *,
        user: User | str,
        client_id: str,
        scopes: Sequence[str],
        resource: str | None = None,
        lifetime: int = ID_JAG_LIFETIME_SECONDS,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """An ID-JAG as the org server issues it: header `typ` oauth-id-jag+jwt, RS256, the org's `kid`; claims `iss`
        (the org), `sub` (the user's id; `user` is a User or a configured login), `aud` (the issuer of
        `auth_server_id`), `client_id`, `jti`, `iat`, `exp`, `resource` (if given), `scope` (if any). `extra_claims`
        and `headers` are applied last; a None value removes the claim or header."""
        person = user if isinstance(user, User) else self._users_by_login[user]
        now = int(self._clock())
        claims: dict[str, Any] = {"iss": self._issuer(ORG), "sub": person.uid, "aud": self._issuer(auth_server_id)}
        claims |= {"client_id": client_id, "jti": secrets.token_urlsafe(24), "iat": now, "exp": now + lifetime}
        claims |= {"resource": resource} if resource is not None else {}
        claims |= {"scope": " ".join(scopes)} if scopes else {}
        signing_key = self._keyring(ORG).signing_key
        return signing_key.sign({**claims, **(extra_claims or {})}, {"typ": ID_JAG_TYP, **(headers or {})})

    # ---- step 1: the org server mints ID-JAGs

    async def exchange(self, request: TokenRequest) -> dict[str, Any]:
        agent = request.client  # an AI agent, or an OIDC app exchanging its own users' ID tokens
        if agent.ai_agent and request.param("client_assertion") is None:
            raise OAuthError(
                "invalid_client",
                "AI agents must authenticate with private_key_jwt to request an ID-JAG.",
                basic_challenge=request.param("client_secret") is None,  # it authenticated with Basic
            )
        if request.param("requested_token_type") != ID_JAG_TOKEN_TYPE:
            raise OAuthError("invalid_request", f"The 'requested_token_type' must be {ID_JAG_TOKEN_TYPE}.")
        subject_token, subject_token_type = request.param("subject_token"), request.param("subject_token_type")
        if subject_token is None or subject_token_type is None:
            raise OAuthError("invalid_request", "The 'subject_token' and 'subject_token_type' parameters are required.")
        if subject_token_type not in (ACCESS_TOKEN_TYPE, ID_TOKEN_TYPE):
            raise OAuthError("invalid_request", "The 'subject_token_type' is not supported.")
        audience = request.param("audience")
        if audience is None:
            raise OAuthError("invalid_request", "The 'audience' parameter is required.")
        server = self._target(audience)
        resource = request.param("resource")
        if resource is not None and not _acceptable_resource(server, resource):
            raise OAuthError("invalid_target", "The 'resource' is not a resource of the target authorization server.")
        requested = list(dict.fromkeys((request.param("scope") or "").split()))
        if any(scope in OIDC_SCOPES for scope in requested):
            raise OAuthError("invalid_scope", "OpenID Connect scopes cannot be requested in an ID-JAG.")
        if any(server.scopes and scope not in server.scopes for scope in requested):
            raise OAuthError("invalid_scope", "One or more scopes are not configured for the authorization server.")
        subject = self._subject(subject_token, subject_token_type, agent.client_id, agent.linked_client_id)
        policy, scopes = self._policy(agent.client_id, server, resource, subject, requested)
        if not scopes:
            raise OAuthError("invalid_scope", "No default scopes are configured; 'scope' must be provided.")
        client_id = policy.target_client_id or agent.client_id
        id_jag = self.mint_id_jag(server.id, user=subject.user, client_id=client_id, scopes=scopes, resource=resource)
        return {
            "access_token": id_jag,
            "issued_token_type": ID_JAG_TOKEN_TYPE,
            "token_type": "N_A",
            "expires_in": ID_JAG_LIFETIME_SECONDS,
            "scope": " ".join(scopes),
        }

    def _target(self, audience: str) -> AuthorizationServer:
        for server in self._servers.values():
            if self._issuer(server.id) == audience:
                if not server.jwt_bearer:
                    raise OAuthError("invalid_target", "The audience authorization server does not accept ID-JAGs.")
                return server
        raise OAuthError("invalid_target", "The 'audience' is not the issuer of a known authorization server.")

    def _subject(self, token: str, token_type: str, agent_id: str, linked_id: str | None) -> _Subject:
        if token_type == ACCESS_TOKEN_TYPE:
            claims = self._verify(token, [*self._servers], "subject token")
            user = self._user(claims.get("uid"))
            if user is None or claims.get("sub") != user.login or not isinstance(claims.get("cid"), str):
                raise OAuthError("invalid_grant", "The subject token is not an access token of a known user.")
            return _Subject(user, claims["cid"])
        claims = self._verify(token, [ORG, *self._servers], "subject token")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if len(audiences) != 1 or not isinstance(audiences[0], str) or audiences[0] not in (agent_id, linked_id):
            raise OAuthError("invalid_grant", "The ID token was not issued to the agent or its linked app.")
        user = self._user(claims.get("sub"))
        if user is None:
            raise OAuthError("invalid_grant", "The subject token's user is not known.")
        return _Subject(user, None)

    def _policy(
        self, agent_id: str, server: AuthorizationServer, resource: str | None, subject: _Subject, requested: list[str]
    ) -> tuple[XaaPolicy, list[str]]:
        """The first policy matching the request, and the scopes it grants."""
        audiences = {server.id, self._issuer(server.id)}
        for policy in self.policies:
            if policy.agent_client_id != agent_id or policy.audience not in audiences:
                continue
            if resource is not None and policy.resources and resource not in policy.resources:
                continue
            if subject.client_id not in (None, agent_id, *policy.delegating_client_ids):
                continue
            if not requested:
                return policy, list(policy.scopes or server.default_scopes)
            scopes = [scope for scope in requested if not policy.scopes or scope in policy.scopes]
            if scopes:
                return policy, scopes
        raise OAuthError("access_denied", "no_matching_policy: no policy allows this agent, audience, resource, scope.")

    # ---- step 2: a custom server redeems ID-JAGs

    async def redeem(self, request: TokenRequest) -> dict[str, Any]:
        server = self._servers[request.auth_server_id]
        assertion = request.param("assertion")
        if assertion is None:
            raise OAuthError("invalid_request", "The 'assertion' parameter is required.")
        if _unverified(assertion, "assertion")[0].get("typ") != ID_JAG_TYP:
            raise OAuthError("invalid_grant", f"The assertion is not an ID-JAG (typ must be {ID_JAG_TYP}).")
        claims = self._verify(assertion, [ORG], "assertion")
        aud = claims.get("aud")
        if (aud if isinstance(aud, list) else [aud]) != [self._issuer(server.id)]:
            raise OAuthError("invalid_grant", "The assertion's audience is not this authorization server.")
        if claims.get("client_id") != request.client.client_id:
            raise OAuthError("invalid_grant", "The assertion's client_id is not the authenticated client.")
        iat, jti = claims.get("iat"), claims.get("jti")
        if not isinstance(iat, int | float) or iat > self._clock() + CLOCK_SKEW_SECONDS:
            raise OAuthError("invalid_grant", "The assertion's iat is missing or in the future.")
        if not isinstance(jti, str) or not jti:
            raise OAuthError("invalid_grant", "The assertion must contain a jti claim.")
        user = self._user(claims.get("sub"))
        if user is None:
            raise OAuthError("invalid_grant", "The assertion's subject is not a known user.")
        resources = _resources(claims.get("resource"))
        if resources is None or any(server.resources and value not in server.resources for value in resources):
            raise OAuthError("invalid_grant", "The assertion's resource is not a resource of this server.")
        granted = claims.get("scope", "")
        if not isinstance(granted, str):
            raise OAuthError("invalid_grant", "The assertion's scope must be a space-separated string.")
        allowed = [scope for scope in granted.split() if not server.scopes or scope in server.scopes]
        requested = (request.param("scope") or "").split() or granted.split()
        scopes = [scope for scope in dict.fromkeys(requested) if scope in allowed]
        if not scopes:
            raise OAuthError("invalid_scope", "None of the requested scopes is granted by the assertion.")
        now, replay_key = self._clock(), (str(claims["iss"]), jti)
        self._used_jtis = {key: exp for key, exp in self._used_jtis.items() if exp > now - CLOCK_SKEW_SECONDS}
        if replay_key in self._used_jtis:
            raise OAuthError("invalid_grant", "The assertion has already been used.")
        self._used_jtis[replay_key] = float(claims["exp"])
        audience = resources[0] if len(resources) == 1 else resources or None
        token = self._mint_access_token(
            server.id, user=user, client_id=request.client.client_id, scopes=scopes, audience=audience
        )
        return {
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_LIFETIME_SECONDS,
            "access_token": token,
            "scope": " ".join(scopes),
        }

    # ---- users and JWTs from the emulator's own servers

    def _user(self, uid: object) -> User | None:
        return self._users.get(uid) if isinstance(uid, str) else None

    def _verify(self, token: str, server_ids: Sequence[str], what: str) -> dict[str, Any]:
        """The claims of `token` if one of `server_ids` signed it with a published key and it has not expired."""
        header, claims = _unverified(token, what)
        issuers = {self._issuer(server_id): server_id for server_id in server_ids}
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in issuers:
            raise OAuthError("invalid_grant", f"The {what} is not from a trusted issuer.")
        key, algorithm = self._keyring(issuers[issuer]).find(header.get("kid")), header.get("alg")
        if key is None or algorithm not in _ALGORITHMS:
            raise OAuthError("invalid_grant", f"The {what} is not signed by a published key of its issuer.")
        try:
            _JWS.decode(token, key.private_key.public_key(), algorithms=[str(algorithm)])
        except jwt.PyJWTError:
            raise OAuthError("invalid_grant", f"The {what} signature is invalid.") from None
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= self._clock() - CLOCK_SKEW_SECONDS:
            raise OAuthError("invalid_grant", f"The {what} has expired (or has no exp).")
        return claims


def _unverified(token: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a JWS, unverified; anything else is `invalid_grant`."""
    try:
        complete = _JWS.decode_complete(token, options={"verify_signature": False})
        claims = json.loads(complete["payload"])
    except (jwt.PyJWTError, ValueError):
        raise OAuthError("invalid_grant", f"The {what} is not a valid JWT.") from None
    if not isinstance(claims, dict):
        raise OAuthError("invalid_grant", f"The {what} is not a valid JWT.")
    return complete["header"], claims


def _resources(claim: object) -> list[str] | None:
    """An ID-JAG's `resource` claim (absent, a string or an array of strings) as a list; None when malformed."""
    if claim is None:
        return []
    values = [claim] if isinstance(claim, str) else claim
    return values if isinstance(values, list) and all(isinstance(v, str) for v in values) else None


def _acceptable_resource(server: AuthorizationServer, resource: str) -> bool:
    """RFC 8707: an absolute URI without a fragment; one of the server's resources when it declares them."""
    return bool(urlsplit(resource).scheme) and "#" not in resource and resource in (server.resources or [resource])
