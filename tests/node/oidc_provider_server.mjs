// A real, OpenID-certified authorization server for the tests: panva's `oidc-provider` 9.13.3 (TESTING.md).
//
// It issues RFC 9068 JWT access tokens through the client_credentials grant with RFC 8707 resource indicators,
// so the gateway's validator is checked against tokens it did not shape itself. Only 127.0.0.1 is bound.
//
// Environment:
//   PORT                          listen port (required); the issuer is `http://127.0.0.1:PORT`
//   OIDC_RESOURCES                space-separated resource indicators this server issues tokens for (required);
//                                 each one's `aud` is the indicator itself, the first is the default resource
//   OIDC_CLIENTS                  JSON array of {"client_id", "client_secret", "okta_cid"} (required): confidential
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
//                                 backend's authorization server, own key — redeems them (RFC 7523).
//   OAP_NPM_DIR                   where `npm ci` installed the packages (default: <repo>/.cache/npm)
//
// The signing key is an RSA key generated at start, whose `kid` is its RFC 7638 thumbprint (a fresh key under a
// fixed `kid` would be wrongly served from a verifier's cached JWKS); its JWK has no `alg`. Once listening it
// prints one line:
//   oidc-provider <version> ready issuer=http://127.0.0.1:PORT kid=<thumbprint>
// Each refused token request prints `oidc-provider: grant.error: <error> <detail>`.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

import {
  ID_JAG, TOKEN_EXCHANGE, agentClient, parseCrossApp, targetProvider, tokenExchangeGrant,
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
const resources = (process.env.OIDC_RESOURCES ?? '').split(/\s+/).filter(Boolean);
if (!resources.length) fail('OIDC_RESOURCES must name at least one resource indicator');
let clientSpecs;
try {
  clientSpecs = JSON.parse(process.env.OIDC_CLIENTS ?? '');
} catch {
  fail('OIDC_CLIENTS must be a JSON array');
}
if (!Array.isArray(clientSpecs) || !clientSpecs.length) fail('OIDC_CLIENTS must be a non-empty JSON array');

const SCOPE = 'mcp:read mcp:write';
const TOKEN_TTL_SECONDS = 600;
const accessTokenAlg = process.env.OIDC_ACCESS_TOKEN_ALG || 'RS256';
if (!['RS256', 'RS384', 'RS512'].includes(accessTokenAlg)) fail('OIDC_ACCESS_TOKEN_ALG must be RS256, RS384 or RS512');
const issuer = `http://127.0.0.1:${port}`;
const tokenPath = process.env.OIDC_TOKEN_PATH || '/token';
if (!/^(\/[A-Za-z0-9._-]+)+$/.test(tokenPath)) fail('OIDC_TOKEN_PATH must be a path such as /oauth2/v1/token');
const crossApp = process.env.OIDC_CROSS_APP ? parseCrossApp(process.env.OIDC_CROSS_APP, fail) : null;
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

const configuration = {
  clients: [
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
  scopes: ['openid', 'offline_access', ...SCOPE.split(' ')],
  cookies: { keys: [cookieKey] },
  ttl: {
    AccessToken: TOKEN_TTL_SECONDS,
    ClientCredentials: TOKEN_TTL_SECONDS,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf ?? resources[0],
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
  const exchange = tokenExchangeGrant({
    jose, errors, issuer, signingKey: privateKey, kid: signingJwk.kid, publicJwks, ...crossApp,
  });
  provider.registerGrantType(exchange.name, exchange.handler, exchange.params);
  target = targetProvider({
    Provider, jose, errors, issuer: crossApp.target.issuer, cookieKey, ...crossApp, idp: { issuer, publicJwks },
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
