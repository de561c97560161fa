// A person's browser through the OAuth front door (DESIGN.md §8), for tests/e2e/test_front_door_browser.py.
//
// Debian's Chromium, driven by the puppeteer that scripts/install-mermaid installs into .cache/mermaid (pinned by
// tests/node/mermaid/package-lock.json; no browser is downloaded): open the client's /oauth/authorize URL, type the
// user's name and password into the Okta emulator's sign-in form and submit it, wait for the gateway's consent page
// (a form posting to /oauth/consent with a `decision=approve` button), check what it says, take a full-page PNG
// screenshot, click Allow, and wait for the browser to land on the client's redirect URI.
//
// Input: one JSON object on stdin (the password stays off the command line):
//   {"authorize_url", "redirect_uri", "gateway_origin", "username", "password", "screenshot" (PNG path),
//    "expect" (texts the consent page must show), "chromium" (executable), "no_sandbox" (bool),
//    "step_timeout_ms"}
// Environment: OAP_MERMAID_DIR, where puppeteer was installed (default: <repo>/.cache/mermaid).
//
// Output: one JSON line on stdout: {"ok": true, "pages": [{"url", "status", "csp"}...] (each top-level
// navigation), "sign_in_title", "consent_title", "consent_url", "consent": {"heading", "approve_box", ...},
// "final_url", "final_text", "console": [...]} — or {"ok": false, "error", ...what was seen} with exit status 1.
// URLs are reported without their query (codes, state). On a failure the page as it then was is saved next to the
// screenshot, as `<screenshot>-failure.png` ("failure_screenshot" in the output).
// The pages need no JavaScript: every page error, CSP violation (Chromium's console report "... violates the
// following Content Security Policy directive ..." and the `securitypolicyviolation` event), and console error on
// the gateway's pages is a failure.

import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const mermaidDir = process.env.OAP_MERMAID_DIR || path.resolve(here, '..', '..', '.cache', 'mermaid');
const seen = { pages: [], console: [], page_errors: [], csp: [] };

// URLs are reported without their query: there go Okta's code, the gateway's code, state and PKCE values
function bare(url) {
  try {
    const parsed = new URL(url);
    return `${parsed.origin}${parsed.pathname}`;
  } catch {
    return String(url);
  }
}

function finish(ok, extra) {
  process.stdout.write(`${JSON.stringify({ ok, ...seen, ...extra })}\n`);
  process.exitCode = ok ? 0 : 1;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

async function loadPuppeteer() {
  // puppeteer lives in the Mermaid cache, not next to this file; ESM ignores NODE_PATH, so resolve it from there
  const requireFromCache = createRequire(path.join(mermaidDir, 'package.json'));
  const module = await import(pathToFileURL(requireFromCache.resolve('puppeteer')).href);
  return module.default;
}

async function watch(page) {
  page.on('console', (message) => {
    const url = bare(message.location()?.url || page.url());
    const entry = { type: message.type(), text: message.text(), url };
    seen.console.push(entry);
    if (/Content Security Policy/i.test(entry.text)) seen.csp.push(entry);
  });
  page.on('pageerror', (error) => {
    seen.page_errors.push({ message: String(error?.message ?? error), url: bare(page.url()) });
  });
  page.on('response', (response) => {
    if (response.request().isNavigationRequest() && response.request().frame() === page.mainFrame()) {
      const csp = response.headers()['content-security-policy'] ?? null;
      seen.pages.push({ url: bare(response.url()), status: response.status(), csp });
    }
  });
  // Our pages run no script; this listener is the browser's, added over the DevTools protocol (CSP does not apply)
  await page.evaluateOnNewDocument(() => {
    document.addEventListener('securitypolicyviolation', (event) => {
      console.error(`Content Security Policy violation: ${event.violatedDirective} blocked ${event.blockedURI}`);
    });
  });
}

function problems(gatewayOrigin) {
  const found = [];
  if (seen.page_errors.length) found.push(`page errors: ${JSON.stringify(seen.page_errors)}`);
  if (seen.csp.length) found.push(`CSP violations: ${JSON.stringify(seen.csp)}`);
  const gatewayErrors = seen.console.filter((entry) => entry.type === 'error' && entry.url.startsWith(gatewayOrigin));
  if (gatewayErrors.length) found.push(`console errors on the gateway's pages: ${JSON.stringify(gatewayErrors)}`);
  return found;
}

async function walk(page, input) {
  page.setDefaultTimeout(input.step_timeout_ms);
  page.setDefaultNavigationTimeout(input.step_timeout_ms);
  await page.setViewport({ width: 800, height: 600 });
  await watch(page);

  // 1. the client opens the authorization URL; the gateway sends the browser on to Okta's sign-in page
  await page.goto(input.authorize_url, { waitUntil: 'load' });
  await page.waitForSelector('form input[name="username"]');
  const signInTitle = await page.title();
  if (page.url().startsWith(input.gateway_origin)) {
    throw new Error(`expected Okta's sign-in page, got ${bare(page.url())}`);
  }

  // 2. the person types their name and password and presses Sign In (the name may be pre-filled: clear it first)
  await page.click('input[name="username"]', { count: 3 });
  await page.keyboard.press('Backspace');
  await page.type('input[name="username"]', input.username);
  await page.type('input[name="password"]', input.password);
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('form button[type="submit"]')]);

  // 3. the gateway's consent page
  const approve = 'form[action="/oauth/consent"][method="post"] button[name="decision"][value="approve"]';
  await page.waitForSelector(approve);
  const consentUrl = bare(page.url());
  if (!consentUrl.startsWith(input.gateway_origin)) {
    throw new Error(`the consent page is not the gateway's: ${consentUrl}`);
  }
  const consentTitle = await page.title();
  const shown = await page.evaluate((selector) => {
    const button = document.querySelector(selector);
    const box = button.getBoundingClientRect();
    return {
      text: document.body.innerText,
      heading: document.querySelector('h1')?.innerText ?? '',
      forms: document.forms.length,
      scripts: document.scripts.length,
      approve_label: button.innerText,
      approve_box: { x: box.x + window.scrollX, y: box.y + window.scrollY, width: box.width, height: box.height },
      page_size: { width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight },
      device_pixel_ratio: window.devicePixelRatio,
    };
  }, approve);
  const missing = input.expect.filter((text) => !shown.text.includes(text));
  if (missing.length) throw new Error(`the consent page does not show ${JSON.stringify(missing)}:\n${shown.text}`);
  await page.screenshot({ path: input.screenshot, fullPage: true, type: 'png' });

  // 4. Allow: the gateway answers 303 to the client's redirect URI, which the browser follows
  await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click(approve)]);
  const finalUrl = bare(page.url());
  const finalText = await page.evaluate(() => document.body.innerText);
  if (!finalUrl.startsWith(input.redirect_uri)) {
    const status = seen.pages.at(-1)?.status;
    throw new Error(`Allow led to ${finalUrl} (${status}), not the redirect URI: ${finalText.slice(0, 500)}`);
  }
  return {
    sign_in_title: signInTitle,
    consent_title: consentTitle,
    consent_url: consentUrl,
    consent: { ...shown, text: undefined },
    final_url: finalUrl,
    final_text: finalText,
  };
}

async function main() {
  const input = await readStdin();
  const puppeteer = await loadPuppeteer();
  const args = ['--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'];
  if (input.no_sandbox) args.push('--no-sandbox'); // Chromium will not start its sandbox as root (CI runs as root)
  const browser = await puppeteer.launch({ executablePath: input.chromium, headless: true, args });
  try {
    const page = await browser.newPage();
    let result;
    try {
      result = await walk(page, input);
    } catch (error) {
      const failure = input.screenshot.replace(/\.png$/, '') + '-failure.png';
      const saved = await page.screenshot({ path: failure, fullPage: true }).then(() => failure, () => null);
      const found = problems(input.gateway_origin);
      finish(false, { error: [String(error?.stack ?? error), ...found].join('\n'), failure_screenshot: saved });
      return;
    }
    const found = problems(input.gateway_origin);
    if (found.length) finish(false, { error: found.join('\n'), ...result });
    else finish(true, result);
  } finally {
    await browser.close();
  }
}

main().catch((error) => finish(false, { error: String(error?.stack ?? error) }));
