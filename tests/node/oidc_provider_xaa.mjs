// Cross App Access (ID-JAG) for the oidc-provider test server (`oidc_provider_server.mjs`), as Okta does it
// (PROTOCOL.md §1–2): both steps are custom grants of real oidc-provider instances (`registerGrantType`), so the
// token endpoint, client authentication (checked by oidc-provider itself), error responses and the
// access tokens of step 2 are oidc-provider's own; the grant logic is written here with `jose` (oidc-provider's own
// JOSE library, installed with it).
//
// Step 1 — `tokenExchangeGrant`, at the IdP (the server's root issuer, Okta's org authorization server): RFC 8693
// with `requested_token_type=urn:ietf:params:oauth:token-type:id-jag`, in one of two modes:
//   - an AI agent, Okta's delegation mode: `subject_token_type=urn:ietf:params:oauth:token-type:access_token`;
//   - the front door's app (`frontDoorApp`, an OIDC web app authenticated with client_secret_basic), the mode of an
//     app that signed the user in: `subject_token_type=urn:ietf:params:oauth:token-type:id_token`, an ID token this
//     IdP issued to that very app (Okta accepts only ID tokens whose audience is the requesting client).
// Checked, in order (PROTOCOL.md §1.1, §2.3):
//   - the client is a configured AI agent or the front door's app (else `unauthorized_client`); it authenticated
//     with its only registered method (checked by oidc-provider);
//   - `requested_token_type`, `subject_token`, `subject_token_type` (access_token for an agent, id_token for the
//     app), `audience` present and supported (else `invalid_request`); `audience` is the target authorization
//     server's issuer and `resource`, when sent, one of its resources (else `invalid_target`); `scope` holds only
//     the target's scopes, no OpenID scopes (else `invalid_scope`);
//   - an agent's subject token: a JWT access token (`typ: at+jwt`) signed by this IdP's own key (RS256/384/512),
//     `iss` this IdP, not expired, and `aud` = the agent's resource — the audience check Okta's delegation mode
//     makes (else `invalid_grant`); the token's client (`client_id`) is the agent or delegates to it (else
//     `access_denied`, Okta's "no matching policy");
//   - the app's subject token: an ID token signed by this IdP's own key (RS256), `iss` this IdP, `aud` the app
//     (with `azp`, if any, the app too), `sub`, `iat`, not expired, and no `typ` of an access token or an ID-JAG
//     (else `invalid_grant`).
// The ID-JAG (§1.3): header `typ: oauth-id-jag+jwt`, RS256, the IdP's `kid`; claims `iss`, `sub` (the subject
// token's), `aud` (the target issuer), `client_id` (the requesting client: its id at the target), `jti`, `iat`,
// `exp` (+300 s), `resource` and `scope` when granted. Response: `issued_token_type=…:id-jag`, `token_type=N_A`,
// `expires_in`.
//
// Step 2 — `targetProvider`: a second oidc-provider, the backend's authorization server, mounted at
// `/oauth2/<id>` (issuer `<root>/oauth2/<id>`, like an Okta custom authorization server). Its jwt-bearer grant
// (RFC 7523) redeems ID-JAGs as §1.5 says: `typ`, signature by the trusted IdP's published key, `iss` the IdP,
// `aud` this issuer, `client_id` = the authenticated client, not expired, `iat` not in the future, `jti` used once,
// `resource` one of its resources; scope = requested ∩ ID-JAG ∩ its own (empty: `invalid_scope`). Every assertion
// defect is `invalid_grant`. The access token is oidc-provider's JWT access token for the user (`sub`), `aud` = the
// resource. Its clients are the agents (private_key_jwt) and the front door's app (client_secret_basic, the secret
// it has at the IdP: one Okta app, known to both). An IdP never redeems its own ID-JAGs: the two are separate
// providers with separate keys.
//
// Each success prints one line (no token, no secret): `oidc-provider: id-jag issued sub=… client_id=…
// subject_token_type=… aud=… resource=…`, `oidc-provider: id-jag redeemed sub=… client_id=… aud=…`.

import * as crypto from 'node:crypto';

export const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
export const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
export const ID_JAG = 'urn:ietf:params:oauth:token-type:id-jag';
export const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
export const ID_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:id_token';
export const ID_JAG_TYP = 'oauth-id-jag+jwt';
export const ID_JAG_GRANT_PROFILE = 'urn:ietf:params:oauth:grant-profile:id-jag';
const ID_JAG_TTL_SECONDS = 300;
const BACKEND_TOKEN_TTL_SECONDS = 3600;
const CLOCK_TOLERANCE_SECONDS = 5;
const OIDC_SCOPES = new Set(['openid', 'profile', 'email', 'address', 'phone', 'offline_access', 'groups']);
// Header types of the JWTs this IdP signs with the same key that are not ID tokens (RFC 9068 §2.1, the ID-JAG draft).
const NOT_ID_TOKEN_TYPES = new Set(['at+jwt', ID_JAG_TYP]);
const EXCHANGE_PARAMS = [
  'subject_token', 'subject_token_type', 'requested_token_type', 'audience', 'resource', 'scope',
  'actor_token', 'actor_token_type',
];

// An agent as both providers register it: a private_key_jwt client allowed only its Cross App Access grant.
export function agentClient({ client_id, jwk }, grantType) {
  return {
    client_id,
    grant_types: [grantType],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'private_key_jwt',
    jwks: { keys: [jwk] },
  };
}

// The front door's app (an OIDC web app with a client secret) as a provider registers it for `grantTypes`.
export function appClient({ client_id, client_secret }, grantTypes, extra = {}) {
  return {
    client_id,
    client_secret,
    grant_types: grantTypes,
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    ...extra,
  };
}

function words(value) {
  return (value ?? '').split(' ').filter(Boolean);
}

// jose's refusals (bad signature, wrong iss/aud/typ, expired, malformed) all become `invalid_grant`, with the
// reason as its detail (never the token).
async function verified(jose, errors, token, keys, options, what) {
  try {
    return await jose.jwtVerify(token, keys, { clockTolerance: CLOCK_TOLERANCE_SECONDS, ...options });
  } catch (error) {
    throw new errors.InvalidGrant(`${what}: ${error.code ?? 'ERR_JWT_INVALID'} ${error.claim ?? ''}`.trim());
  }
}

export function tokenExchangeGrant({
  jose, errors, issuer, signingKey, kid, publicJwks, agents, target, frontDoorApp = null,
}) {
  const ownKeys = jose.createLocalJWKSet(publicJwks);
  const agentsById = new Map(agents.map((agent) => [agent.client_id, agent]));

  // An agent's access token (Okta's delegation mode): for the agent's resource, from a client that delegates to it.
  async function accessTokenSubject(agent, token) {
    const { payload } = await verified(jose, errors, token, ownKeys, {
      issuer,
      audience: agent.resource,
      typ: 'at+jwt',
      algorithms: ['RS256', 'RS384', 'RS512'],
      requiredClaims: ['exp', 'sub', 'client_id'],
    }, 'subject_token');
    if (payload.client_id !== agent.client_id && !agent.delegating_client_ids.includes(payload.client_id)) {
      throw new errors.AccessDenied('no_matching_policy: the subject token\'s client does not delegate to this agent');
    }
    return payload;
  }

  // The app's ID token (OIDC Core §2): issued by this IdP to the requesting app, for a user.
  async function idTokenSubject(appClientId, token) {
    let header;
    try {
      header = jose.decodeProtectedHeader(token);
    } catch {
      throw new errors.InvalidGrant('subject_token: not a JWS');
    }
    const typ = typeof header.typ === 'string' ? header.typ.toLowerCase().replace(/^application\//, '') : '';
    if (NOT_ID_TOKEN_TYPES.has(typ)) throw new errors.InvalidGrant(`subject_token: typ ${typ} is not an ID token`);
    const { payload } = await verified(jose, errors, token, ownKeys, {
      issuer,
      audience: appClientId,
      algorithms: ['RS256'],
      requiredClaims: ['exp', 'iat', 'sub'],
    }, 'subject_token');
    if (payload.azp !== undefined && payload.azp !== appClientId) {
      throw new errors.InvalidGrant('subject_token: azp names another client');
    }
    return payload;
  }

  async function handler(ctx) {
    const { client, params } = ctx.oidc;
    const agent = agentsById.get(client.clientId);
    const isApp = frontDoorApp !== null && client.clientId === frontDoorApp.client_id;
    if (!agent && !isApp) {
      throw new errors.UnauthorizedClient('only AI agents and the front door app may request ID-JAGs');
    }
    if (params.requested_token_type !== ID_JAG) {
      throw new errors.InvalidRequest(`requested_token_type must be ${ID_JAG}`);
    }
    if (!params.subject_token || !params.subject_token_type) {
      throw new errors.InvalidRequest('subject_token and subject_token_type are required');
    }
    if (params.subject_token_type !== (agent ? ACCESS_TOKEN_TYPE : ID_TOKEN_TYPE)) {
      throw new errors.InvalidRequest('unsupported subject_token_type');
    }
    if (!params.audience) throw new errors.InvalidRequest('audience is required');
    if (params.audience !== target.issuer) {
      throw new errors.InvalidTarget('audience is not a known authorization server');
    }
    if (params.resource !== undefined && !target.resources.includes(params.resource)) {
      throw new errors.InvalidTarget('resource is not a resource of the audience');
    }
    const requested = words(params.scope);
    if (requested.some((scope) => OIDC_SCOPES.has(scope) || !target.scopes.includes(scope))) {
      throw new errors.InvalidScope('only the target authorization server\'s scopes may be asked for', params.scope);
    }

    const subject = agent
      ? await accessTokenSubject(agent, params.subject_token)
      : await idTokenSubject(client.clientId, params.subject_token);

    const granted = requested.length ? requested : target.scopes;
    const now = Math.floor(Date.now() / 1000);
    const claims = {
      sub: subject.sub,
      client_id: client.clientId,
      jti: crypto.randomUUID(),
      ...(params.resource ? { resource: params.resource } : {}),
      ...(granted.length ? { scope: granted.join(' ') } : {}),
    };
    const idJag = await new jose.SignJWT(claims)
      .setProtectedHeader({ alg: 'RS256', typ: ID_JAG_TYP, kid })
      .setIssuer(issuer)
      .setAudience(target.issuer)
      .setIssuedAt(now)
      .setExpirationTime(now + ID_JAG_TTL_SECONDS)
      .sign(signingKey);
    console.log(
      `oidc-provider: id-jag issued sub=${subject.sub} client_id=${client.clientId} `
      + `subject_token_type=${params.subject_token_type} aud=${target.issuer} resource=${params.resource ?? '-'}`,
    );
    ctx.body = {
      access_token: idJag,
      issued_token_type: ID_JAG,
      token_type: 'N_A',
      expires_in: ID_JAG_TTL_SECONDS,
      ...(granted.length ? { scope: granted.join(' ') } : {}),
    };
  }

  return { name: TOKEN_EXCHANGE, handler, params: EXCHANGE_PARAMS };
}

// The backend's authorization server, issuer `targetIssuer`; it redeems the ID-JAGs of `idp`.
export function targetProvider({
  Provider, jose, errors, issuer, target, agents, idp, cookieKey, frontDoorApp = null,
}) {
  const idpKeys = jose.createLocalJWKSet(idp.publicJwks);
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig' };
  signingJwk.kid = crypto.createHash('sha256')
    .update(JSON.stringify({ e: signingJwk.e, kty: signingJwk.kty, n: signingJwk.n }))
    .digest('base64url');
  const scope = target.scopes.join(' ');
  const resourceServer = (resource) => ({
    audience: resource,
    scope,
    accessTokenTTL: BACKEND_TOKEN_TTL_SECONDS,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  });
  const provider = new Provider(issuer, {
    clients: [
      ...agents.map((agent) => agentClient(agent, JWT_BEARER)),
      ...(frontDoorApp ? [appClient(frontDoorApp, [JWT_BEARER])] : []),
    ],
    jwks: { keys: [signingJwk] },
    scopes: target.scopes,
    cookies: { keys: [cookieKey] },
    discovery: { authorization_grant_profiles_supported: [ID_JAG_GRANT_PROFILE] },
    features: {
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => target.resources[0],
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resource) => {
          if (!target.resources.includes(resource)) throw new errors.InvalidTarget();
          return resourceServer(resource);
        },
      },
    },
  });

  const used = new Map(); // jti → exp, of redeemed ID-JAGs (the one issuer trusted)

  async function handler(ctx) {
    const { client, params } = ctx.oidc;
    if (!params.assertion) throw new errors.InvalidRequest('assertion is required');
    const { payload } = await verified(jose, errors, params.assertion, idpKeys, {
      issuer: idp.issuer,
      audience: issuer,
      typ: ID_JAG_TYP,
      algorithms: ['RS256', 'RS384', 'RS512', 'ES256'],
      requiredClaims: ['sub', 'client_id', 'jti', 'iat', 'exp'],
    }, 'assertion');
    if (payload.client_id !== client.clientId) throw new errors.InvalidGrant('assertion: client_id is not the client');
    const now = Math.floor(Date.now() / 1000);
    if (payload.iat > now + CLOCK_TOLERANCE_SECONDS) throw new errors.InvalidGrant('assertion: iat in the future');
    for (const [jti, exp] of used) if (exp < now - CLOCK_TOLERANCE_SECONDS) used.delete(jti);
    if (used.has(payload.jti)) throw new errors.InvalidGrant('assertion: already used');
    const resources = payload.resource === undefined ? [] : [payload.resource].flat();
    if (resources.length > 1 || resources.some((value) => !target.resources.includes(value))) {
      throw new errors.InvalidGrant('assertion: resource is not a resource of this server');
    }
    const allowed = new Set(words(payload.scope).filter((value) => target.scopes.includes(value)));
    const scopes = [...new Set(words(params.scope).length ? words(params.scope) : words(payload.scope))]
      .filter((value) => allowed.has(value));
    if (!scopes.length) throw new errors.InvalidScope('no requested scope is granted by the assertion', params.scope);
    used.set(payload.jti, payload.exp);

    const resource = resources[0] ?? target.resources[0];
    const token = new provider.AccessToken({
      accountId: payload.sub, client, scope: scopes.join(' '), gty: JWT_BEARER,
    });
    token.resourceServer = new provider.ResourceServer(resource, resourceServer(resource));
    ctx.oidc.entity('AccessToken', token);
    const value = await token.save();
    console.log(`oidc-provider: id-jag redeemed sub=${payload.sub} client_id=${client.clientId} aud=${resource}`);
    ctx.body = { access_token: value, token_type: token.tokenType, expires_in: token.expiration, scope: token.scope };
  }

  provider.registerGrantType(JWT_BEARER, handler, ['assertion', 'scope']);
  return provider;
}

// `OIDC_CROSS_APP` (JSON): {"agents": [{"client_id", "jwk", "resource", "delegating_client_ids"}],
// "target": {"id", "resources", "scopes"}}; `fail` reports a malformed value. `agents` may be empty only when the
// front door's app is the one that exchanges (`allowNoAgents`).
export function parseCrossApp(raw, fail, { allowNoAgents = false } = {}) {
  let spec;
  try {
    spec = JSON.parse(raw);
  } catch {
    fail('OIDC_CROSS_APP must be JSON');
  }
  const agents = Array.isArray(spec?.agents) ? spec.agents : [];
  const target = spec?.target ?? {};
  if ((!agents.length && !allowNoAgents) || agents.some((a) => !a.client_id || !a.jwk || !a.resource)) {
    fail('OIDC_CROSS_APP.agents must list {client_id, jwk, resource}');
  }
  if (!/^[A-Za-z0-9_-]+$/.test(target.id ?? '') || !Array.isArray(target.resources) || !target.resources.length) {
    fail('OIDC_CROSS_APP.target must be {id, resources, scopes}');
  }
  if (target.id === 'v1') fail('OIDC_CROSS_APP.target.id `v1` would hide the org server\'s /oauth2/v1/ endpoints');
  return {
    agents: agents.map((a) => ({ ...a, delegating_client_ids: a.delegating_client_ids ?? [] })),
    target: { id: target.id, resources: target.resources, scopes: target.scopes ?? [] },
  };
}
