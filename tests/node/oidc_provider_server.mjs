// A real, OpenID-certified authorization server for the tests: panva's `oidc-provider` 9.13.3 (TESTING.md).
//
// It issues RFC 9068 JWT access tokens through the client_credentials grant with RFC 8707 resource indicators,
// so the gateway's validator is checked against tokens it did not shape itself. Only 127.0.0.1 is bound.
//
// Environment:
//   PORT                          listen port (required); the issuer is `http://127.0.0.1:PORT`
//   OIDC_RESOURCES                space-separated resource indicators this server issues tokens for (required
//                                 unless OIDC_FRONT_DOOR is set); each one's `aud` is the indicator itself, the
//                                 first is the default resource
//   OIDC_CLIENTS                  JSON array of {"client_id", "client_secret", "okta_cid"} (required, may be empty
//                                 when OIDC_FRONT_DOOR is set): confidential
//                                 clients (client_credentials, client_secret_basic, scope `mcp:read mcp:write`);
//                                 `okta_cid: true` adds an Okta-style `cid` claim (= client id) to their tokens.
//                                 oidc-provider itself always puts the client id in the `client_id` claim.
//   OIDC_ACCESS_TOKEN_ALG         the access tokens' JWS algorithm: RS256 (default), RS384 or RS512
//   OIDC_HIDE_RFC8414             `1`: answer 404 at /.well-known/oauth-authorization-server (OIDC discovery only)
//   OIDC_TOKEN_PATH               the token endpoint's path (default `/token`; `/oauth2/v1/token` is where Okta's
//                                 org authorization server has it, and where the gateway sends Cross App Access
//                                 step 1: `{OKTA_DOMAIN}/oauth2/v1/token`)
//   OIDC_CROSS_APP                JSON, optional: Cross App Access as Okta does it (`oidc_provider_xaa.mjs`):
//                                 {"agents": [{"client_id", "jwk" (public), "resource", "delegating_client_ids"}],
//                                  "target": {"id", "resources", "scopes"}}. This server then mints ID-JAGs for
//                                 the agents (RFC 8693, private_key_jwt, access-token subjects whose `aud` is the
//                                 agent's `resource`), and a second oidc-provider at `/oauth2/<id>` — the
//                                 backend's authorization server, own key — redeems them (RFC 7523). `agents`
//                                 may be empty with OIDC_FRONT_DOOR: the front door's app then exchanges.
//   OIDC_FRONT_DOOR               JSON, optional: the server plays an Okta org for a web app that signs users in
//                                 (the gateway's OAuth front door, DESIGN.md §8):
//                                 {"app": {"client_id", "client_secret", "redirect_uri"}, "users": [{"login",
//                                 "sub", "password", "name", "groups"}], "id_token_ttl": seconds (default 3600)}.
//                                 Okta's org paths: `/oauth2/v1/authorize`, `/oauth2/v1/token`, `/oauth2/v1/keys`,
//                                 `/oauth2/v1/userinfo`, `/oauth2/v1/revoke`, `/oauth2/v1/logout` (the issuer stays
//                                 the bare base URL, as an org's does). The app: authorization_code with PKCE
//                                 (required), refresh_token (rotated on every use, as Okta's "rotate token after
//                                 every use"), client_secret_basic, ID tokens RS256 carrying the scopes' claims
//                                 (`name`, `preferred_username`, `email`, `groups` for the `groups` scope). The
//                                 sign-in page (`/interaction/<uid>`) is a form posting `username` and `password`,
//                                 checked against `users`; consent is granted without asking, as for an org's
//                                 first-party app, and `offline_access` needs no `prompt=consent` (as at Okta;
//                                 OIDC Core §11, which oidc-provider follows, asks for it). With OIDC_CROSS_APP
//                                 the app may also exchange its users' ID tokens for ID-JAGs (`subject_token_type=
//                                 …:id_token`), and redeem them at the target as itself (client_secret_basic).
//   OAP_NPM_DIR                   where `npm ci` installed the packages (default: <repo>/.cache/npm)
//
// The signing key is an RSA key generated at start, whose `kid` is its RFC 7638 thumbprint (a fresh key under a
// fixed `kid` would be wrongly served from a verifier's cached JWKS); its JWK has no `alg`. Once listening it
// prints one line:
//   oidc-provider <version> ready issuer=http://127.0.0.1:PORT kid=<thumbprint>
// Each refused token request prints `oidc-provider: grant.error: <error> <detail>`. In front door mode each sign-in
// prints `oidc-provider: sign-in sub=<sub>` (or `oidc-provider: sign-in refused`), and each token the app gets
// `oidc-provider: token issued grant_type=<grant> client_id=<id> sub=<sub>` (never a token, password or secret).

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import {
  ID_JAG, TOKEN_EXCHANGE, agentClient, appClient, parseCrossApp, targetProvider, tokenExchangeGrant,
} from './oidc_provider_xaa.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const npmDir = process.env.OAP_NPM_DIR || path.resolve(here, '..', '..', '.cache', 'npm');

function fail(message) {
  console.error(`oidc-provider: ${message}`);
  process.exit(2);
}

// The package lives in the npm cache, not next to this file, so resolve it from there (ESM ignores NODE_PATH).
const requireFromCache = createRequire(path.join(npmDir, 'package.json'));
let oidc;
let jose;
try {
  oidc = await import(pathToFileURL(requireFromCache.resolve('oidc-provider')).href);
  jose = await import(pathToFileURL(requireFromCache.resolve('jose')).href); // oidc-provider's own JOSE library
} catch (error) {
  fail(`cannot load oidc-provider from ${npmDir}: ${error.message}`);
}
const { default: Provider, errors } = oidc;
const { version } = requireFromCache('oidc-provider/package.json');

const port = Number.parseInt(process.env.PORT ?? '', 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) fail('PORT must be a TCP port');
const frontDoor = process.env.OIDC_FRONT_DOOR ? parseFrontDoor(process.env.OIDC_FRONT_DOOR) : null;
const resources = (process.env.OIDC_RESOURCES ?? '').split(/\s+/).filter(Boolean);
if (!resources.length && !frontDoor) fail('OIDC_RESOURCES must name at least one resource indicator');
let clientSpecs;
try {
  clientSpecs = JSON.parse(process.env.OIDC_CLIENTS ?? '');
} catch {
  fail('OIDC_CLIENTS must be a JSON array');
}
if (!Array.isArray(clientSpecs) || (!clientSpecs.length && !frontDoor)) {
  fail('OIDC_CLIENTS must be a non-empty JSON array');
}

const SCOPE = 'mcp:read mcp:write';
const TOKEN_TTL_SECONDS = 600;
const accessTokenAlg = process.env.OIDC_ACCESS_TOKEN_ALG || 'RS256';
if (!['RS256', 'RS384', 'RS512'].includes(accessTokenAlg)) fail('OIDC_ACCESS_TOKEN_ALG must be RS256, RS384 or RS512');
const issuer = `http://127.0.0.1:${port}`;
const tokenPath = process.env.OIDC_TOKEN_PATH || '/token';
if (!/^(\/[A-Za-z0-9._-]+)+$/.test(tokenPath)) fail('OIDC_TOKEN_PATH must be a path such as /oauth2/v1/token');
const crossApp = process.env.OIDC_CROSS_APP
  ? parseCrossApp(process.env.OIDC_CROSS_APP, fail, { allowNoAgents: Boolean(frontDoor) })
  : null;
const targetPrefix = crossApp ? `/oauth2/${crossApp.target.id}` : null;
if (crossApp) crossApp.target.issuer = issuer + targetPrefix;

// RFC 7638 §3: SHA-256 over the required members in lexicographic order, without whitespace.
function rsaThumbprint({ e, kty, n }) {
  return crypto.createHash('sha256').update(JSON.stringify({ e, kty, n })).digest('base64url');
}

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = privateKey.export({ format: 'jwk' });
signingJwk.kid = rsaThumbprint(signingJwk);
signingJwk.use = 'sig';
// No `alg` member (RFC 7517 §4.4: optional): the key may sign RS256, RS384 or RS512, as oidc-provider's keys
// usually do. Okta's JWKS names `alg`; a verifier must handle both.

const cookieKey = crypto.randomBytes(32).toString('base64url');
const oktaShaped = new Set(clientSpecs.filter((c) => c.okta_cid).map((c) => c.client_id));

// ---- front door mode: an Okta org's sign-in for one OIDC web app

// `OIDC_FRONT_DOOR` (module doc); `fail` on anything malformed.
function parseFrontDoor(raw) {
  let spec;
  try {
    spec = JSON.parse(raw);
  } catch {
    fail('OIDC_FRONT_DOOR must be JSON');
  }
  const app = spec?.app ?? {};
  if (!app.client_id || !app.client_secret || !/^https?:\/\//.test(app.redirect_uri ?? '')) {
    fail('OIDC_FRONT_DOOR.app must be {client_id, client_secret, redirect_uri}');
  }
  const users = Array.isArray(spec?.users) ? spec.users : [];
  if (!users.length || users.some((u) => !u.login || !u.sub || typeof u.password !== 'string')) {
    fail('OIDC_FRONT_DOOR.users must list {login, sub, password, name, groups}');
  }
  const idTokenTtl = spec.id_token_ttl ?? 3600;
  if (!Number.isInteger(idTokenTtl) || idTokenTtl < 60) fail('OIDC_FRONT_DOOR.id_token_ttl must be ≥ 60 seconds');
  return {
    app,
    users: users.map((u) => ({ ...u, name: u.name || u.login, groups: u.groups ?? [] })),
    idTokenTtl,
  };
}

const ORG_ROUTES = {
  authorization: '/oauth2/v1/authorize',
  jwks: '/oauth2/v1/keys',
  userinfo: '/oauth2/v1/userinfo',
  revocation: '/oauth2/v1/revoke',
  end_session: '/oauth2/v1/logout',
};
// What the app's ID tokens say for each scope, as Okta's org server does (the `groups` scope: the user's groups).
const CLAIMS = {
  openid: ['sub'],
  profile: ['name', 'preferred_username'],
  email: ['email', 'email_verified'],
  groups: ['groups'],
};
const REFRESH_TOKEN_TTL_SECONDS = 24 * 3600;

function digest(value) {
  return crypto.createHash('sha256').update(String(value ?? '')).digest();
}

// The user `login` names, if `password` is theirs (compared in constant time over digests).
function signIn(login, password) {
  const user = frontDoor.users.find((u) => u.login === login);
  const ok = crypto.timingSafeEqual(digest(user?.password ?? crypto.randomUUID()), digest(password));
  return user && ok ? user : null;
}

async function findAccount(_ctx, sub) {
  const user = frontDoor.users.find((u) => u.sub === sub);
  if (!user) return undefined;
  return {
    accountId: user.sub,
    claims: async () => ({
      sub: user.sub,
      name: user.name,
      preferred_username: user.login,
      email: user.login,
      email_verified: true,
      groups: user.groups,
    }),
  };
}

// Okta issues a refresh token to an app that asks for `offline_access`, `prompt` or not; oidc-provider follows OIDC
// Core §11 and ignores that scope unless `prompt` includes `consent`. So an authorization request of the app for
// `offline_access` without a `prompt` is taken as prompting consent — which the org grants its first-party app
// without asking (`grantConsent`): the person sees no more than at Okta.
async function offlineAccessAsAtOkta(ctx, next) {
  const { query } = ctx;
  const offline = typeof query.scope === 'string' && query.scope.split(' ').includes('offline_access');
  if (
    ctx.path === ORG_ROUTES.authorization && ctx.method === 'GET' && query.client_id === frontDoor.app.client_id
    && offline && query.prompt === undefined
  ) {
    ctx.query = { ...query, prompt: 'consent' };
  }
  return next();
}

// The consent prompt, answered for the org's app: every OpenID scope it asked for is granted.
async function grantConsent(details) {
  const { Grant } = provider;
  const grant = (details.grantId && await Grant.find(details.grantId))
    || new Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
  const missing = details.prompt.details.missingOIDCScope;
  if (missing?.length) grant.addOIDCScope(missing.join(' '));
  return { consent: { grantId: await grant.save() } };
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function signInPage(uid, refused) {
  const notice = refused ? '<p role="alert">Sign-in failed: unknown user or wrong password.</p>' : '';
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>Sign in</title></head>
<body><h1>Sign in</h1>${notice}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
<label>Username <input name="username" autocomplete="username"></label>
<label>Password <input type="password" name="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button>
</form></body></html>`;
}

async function readForm(req, limit = 16 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) return null;
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

// The sign-in interaction: GET `/interaction/<uid>` shows the form, POST `/interaction/<uid>/login` checks it.
// oidc-provider finds the interaction from its own cookie; the `uid` in the path must be that one.
async function interactionRoutes(ctx, next) {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(\/login)?$/.exec(ctx.path);
  if (!match) return next();
  ctx.set('Cache-Control', 'no-store');
  let details;
  try {
    details = await provider.interactionDetails(ctx.req, ctx.res);
  } catch {
    details = null;
  }
  if (!details || details.uid !== match[1]) {
    ctx.status = 400;
    ctx.type = 'text';
    ctx.body = 'This sign-in has expired or is unknown; start again.';
    return undefined;
  }
  const finish = async (result) => {
    const to = await provider.interactionResult(ctx.req, ctx.res, result);
    ctx.status = 303;
    ctx.redirect(to);
  };
  if (details.prompt.name === 'consent' && details.params.client_id === frontDoor.app.client_id) {
    return finish(await grantConsent(details));
  }
  if (details.prompt.name !== 'login') {
    return finish({ error: 'access_denied', error_description: `${details.prompt.name} is not asked at this org` });
  }
  if (ctx.method === 'GET' && !match[2]) {
    ctx.type = 'html';
    ctx.body = signInPage(details.uid, false);
    return undefined;
  }
  if (ctx.method !== 'POST' || !match[2]) {
    ctx.status = 405;
    return undefined;
  }
  const form = await readForm(ctx.req);
  const user = form && signIn(form.get('username'), form.get('password'));
  if (!user) {
    console.log('oidc-provider: sign-in refused');
    ctx.type = 'html';
    ctx.body = signInPage(details.uid, true);
    return undefined;
  }
  console.log(`oidc-provider: sign-in sub=${user.sub}`);
  return finish({ login: { accountId: user.sub } });
}

const frontDoorConfiguration = frontDoor ? {
  routes: { ...ORG_ROUTES, token: tokenPath },
  scopes: ['openid', 'profile', 'email', 'offline_access', 'groups'],
  claims: CLAIMS,
  conformIdTokenClaims: false, // the scopes' claims go into the ID token, as Okta puts them there
  findAccount,
  rotateRefreshToken: true,
  pkce: { required: () => true },
  ttl: { IdToken: frontDoor.idTokenTtl, RefreshToken: REFRESH_TOKEN_TTL_SECONDS },
} : {};

const configuration = {
  clients: [
    ...(frontDoor ? [appClient(frontDoor.app, [
      'authorization_code', 'refresh_token', ...(crossApp ? [TOKEN_EXCHANGE] : []),
    ], {
      response_types: ['code'],
      redirect_uris: [frontDoor.app.redirect_uri],
      id_token_signed_response_alg: 'RS256',
    })] : []),
    ...clientSpecs.map(({ client_id, client_secret }) => ({
      client_id,
      client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
      scope: SCOPE,
    })),
    ...(crossApp?.agents ?? []).map((agent) => agentClient(agent, TOKEN_EXCHANGE)),
  ],
  routes: { token: tokenPath },
  ...(crossApp ? { discovery: { identity_chaining_requested_token_types_supported: [ID_JAG] } } : {}),
  jwks: { keys: [signingJwk] },
  cookies: { keys: [cookieKey] },
  ...frontDoorConfiguration,
  scopes: [...new Set(['openid', 'offline_access', ...(frontDoorConfiguration.scopes ?? []), ...SCOPE.split(' ')])],
  ttl: {
    AccessToken: TOKEN_TTL_SECONDS,
    ClientCredentials: TOKEN_TTL_SECONDS,
    ...frontDoorConfiguration.ttl,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // The front door's app asks for no resource: its access token is then the org's opaque userinfo token.
      defaultResource: async (_ctx, client, oneOf) => (
        oneOf ?? (client?.clientId === frontDoor?.app.client_id ? undefined : resources[0])),
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resourceIndicator) => {
        if (!resources.includes(resourceIndicator)) throw new errors.InvalidTarget();
        return {
          audience: resourceIndicator,
          scope: SCOPE,
          accessTokenTTL: TOKEN_TTL_SECONDS,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: accessTokenAlg } },
        };
      },
    },
  },
  // Okta names the client in `cid`; oidc-provider already sets `client_id` (RFC 9068 §2.2) and keeps it.
  extraTokenClaims: async (_ctx, token) => (oktaShaped.has(token.clientId) ? { cid: token.clientId } : undefined),
};

const provider = new Provider(issuer, configuration);
const handlers = [provider];
let target = null;
if (crossApp) {
  const { kty, n, e, kid } = signingJwk;
  const publicJwks = { keys: [{ kty, n, e, kid, use: 'sig' }] };
  const frontDoorApp = frontDoor?.app ?? null;
  const exchange = tokenExchangeGrant({
    jose, errors, issuer, signingKey: privateKey, kid: signingJwk.kid, publicJwks, ...crossApp, frontDoorApp,
  });
  provider.registerGrantType(exchange.name, exchange.handler, exchange.params);
  target = targetProvider({
    Provider,
    jose,
    errors,
    issuer: crossApp.target.issuer,
    cookieKey,
    ...crossApp,
    idp: { issuer, publicJwks },
    frontDoorApp,
  });
  handlers.push(target);
}
for (const each of handlers) {
  each.on('server_error', (_ctx, error) => console.error(`oidc-provider: server_error: ${error.stack}`));
  each.on('grant.error', (_ctx, error) => {
    const detail = error.error_detail ?? error.error_description ?? '';
    console.error(`oidc-provider: grant.error: ${error.error ?? error.message} ${detail}`);
  });
}

if (frontDoor) {
  provider.use(offlineAccessAsAtOkta);
  provider.use(interactionRoutes);
  provider.on('grant.success', (ctx) => {
    const { client, params, entities } = ctx.oidc;
    const userGrant = ['authorization_code', 'refresh_token'].includes(params.grant_type);
    if (client?.clientId !== frontDoor.app.client_id || !userGrant) return;
    const sub = entities.AuthorizationCode?.accountId ?? entities.RefreshToken?.accountId ?? '-';
    console.log(`oidc-provider: token issued grant_type=${params.grant_type} client_id=${client.clientId} sub=${sub}`);
  });
}

// oidc-provider serves its metadata at both the OIDC and the RFC 8414 location; hiding the latter makes a client's
// discovery fall back to `/.well-known/openid-configuration`.
if (process.env.OIDC_HIDE_RFC8414 === '1') {
  provider.use(async (ctx, next) => {
    if (ctx.path === '/.well-known/oauth-authorization-server') {
      ctx.status = 404;
      ctx.body = { error: 'not_found' };
      return;
    }
    await next();
  });
}

// The target authorization server lives under its issuer's path, as an Okta custom authorization server does; it
// sees the path without the prefix, and `originalUrl` tells oidc-provider where it is mounted.
const root = provider.callback();
const mounted = target?.callback();
const server = http.createServer((req, res) => {
  if (targetPrefix && (req.url === targetPrefix || req.url.startsWith(`${targetPrefix}/`))) {
    req.originalUrl = req.url;
    req.url = req.url.slice(targetPrefix.length) || '/';
    return mounted(req, res);
  }
  return root(req, res);
});
server.on('error', (error) => fail(`cannot listen on 127.0.0.1:${port}: ${error.message}`));
server.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ${version} ready issuer=${issuer} kid=${signingJwk.kid}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
