// Drives the playground (GET /) in headless Debian chromium through playwright-core; run by
// tests/playground.rs against the real server on the tiny model.
//
//   node tests/browser/playground.mjs open|auth
//
// Environment: PLAYGROUND_URL (the server), PLAYGROUND_EXPECT (JSON: the server's own
// non-streamed greedy answers, from the Rust test), PLAYGROUND_SHOTS (folder for screenshots),
// PLAYGROUND_KEY (auth mode), CHROMIUM (default /usr/bin/chromium).
// Prints one JSON line of what it saw; exits non-zero on the first failed check.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import path from 'node:path';

const mode = process.argv[2];
const url = process.env.PLAYGROUND_URL;
const expect = JSON.parse(process.env.PLAYGROUND_EXPECT || '{}');
const shots = process.env.PLAYGROUND_SHOTS;
const TIMEOUT_MS = 30_000;

// Never hang a test run: the whole script gets two minutes.
setTimeout(() => {
  console.error('playground.mjs: timed out after 120 s');
  process.exit(3);
}, 120_000).unref();

const seen = { mode };

/**
 * Records every text the matching elements were given, from the mutation records themselves
 * (so updates made within one task are all seen): one entry per rendered chunk.
 */
async function watchLengths(page, selector) {
  await page.evaluate((sel) => {
    window.__lengths = window.__lengths || {};
    const lengths = (window.__lengths[sel] = []);
    new MutationObserver((records) => {
      for (const r of records) {
        if (!(r.target instanceof Element) || !r.target.matches(sel)) continue;
        for (const n of r.addedNodes) {
          if (n.nodeType === Node.TEXT_NODE) lengths.push(n.data.length);
        }
      }
    }).observe(document.body, { subtree: true, childList: true });
  }, selector);
}

async function lengths(page, selector) {
  return page.evaluate((sel) => window.__lengths[sel], selector);
}

async function setup(page) {
  await page.goto(url);
  await page.waitForSelector('body[data-ready="1"]');
  await page.fill('#temperature', '0');
  await page.fill('#max-tokens', String(expect.max_tokens));
}

/** Sends `prompt` in the chat; returns the answer's text and what its element recorded. */
async function chat(page, prompt) {
  const n = await page.locator('.msg.assistant').count();
  await page.fill('#chat-input', prompt);
  await page.click('#chat-send');
  const answer = page.locator('.msg.assistant .answer').nth(n);
  await answer.waitFor();
  await page.waitForFunction(
    (i) => {
      const el = document.querySelectorAll('.msg.assistant .answer')[i];
      return el && el.dataset.state !== 'streaming';
    },
    n,
    { timeout: TIMEOUT_MS },
  );
  const stats = await page.locator('.msg.assistant .stats').nth(n).textContent();
  return {
    text: await answer.textContent(),
    state: await answer.getAttribute('data-state'),
    chunks: Number(await answer.getAttribute('data-chunks')),
    tokens: Number(await answer.getAttribute('data-tokens')),
    stats,
  };
}

async function openMode(page) {
  await setup(page);
  assert.equal(await page.textContent('#base-badge'), expect.base);
  assert.equal(await page.isVisible('#error'), false, 'no error on a server without a key');

  // Chat with the base: the streamed text equals the server's non-streamed greedy answer, and
  // the page showed it growing, chunk by chunk.
  await watchLengths(page, '.msg.assistant .answer');
  const c = await chat(page, expect.prompt);
  assert.equal(c.state, 'done', `chat ended as ${c.state}: ${c.stats}`);
  assert.ok(c.text.length > 0, 'the chat answer is empty');
  assert.equal(c.text, expect.base_answer, 'streamed chat text differs from the API answer');
  assert.ok(c.chunks > 1, `only ${c.chunks} SSE chunk(s) carried text`);
  assert.equal(c.tokens, expect.base_tokens, 'usage.completion_tokens');
  assert.match(c.stats, /tok\/s/);
  // The page rendered the answer chunk by chunk: growing texts, one per chunk.
  const grew = (await lengths(page, '.msg.assistant .answer')).filter((n) => n > 0);
  assert.ok(grew.length > 1, `the answer was rendered at once, not streamed: lengths ${grew}`);
  assert.ok(grew.every((n, i) => i === 0 || n >= grew[i - 1]), `lengths ${grew} shrank`);
  assert.equal(grew[grew.length - 1], c.text.length);
  seen.chat = { chunks: c.chunks, tokens: c.tokens, lengths_seen: grew.length, stats: c.stats };
  await page.screenshot({ path: path.join(shots, 'playground-chat.png') });

  // Compare: two adapters and a weighted stack of both, streamed in parallel columns.
  await page.click('.tab[data-tab="compare"]');
  await page.click('#compare-add');
  const cols = page.locator('.column');
  assert.equal(await cols.count(), 3);
  const [a, b] = expect.adapters;
  await cols.nth(0).locator('select').selectOption(`adapter:${a}`);
  await cols.nth(1).locator('select').selectOption(`adapter:${b}`);
  await cols.nth(2).locator('select').selectOption('stack');
  for (const [name, w] of Object.entries(expect.stack)) {
    await cols.nth(2).locator(`input[data-adapter="${name}"]`).fill(String(w));
  }
  await page.fill('#compare-input', expect.prompt);
  await page.click('#compare-run');
  await page.waitForFunction(
    () => [...document.querySelectorAll('.column .answer')].every((e) => e.dataset.state && e.dataset.state !== 'streaming'),
    null,
    { timeout: TIMEOUT_MS },
  );
  const got = [];
  for (let i = 0; i < 3; i++) {
    const ans = cols.nth(i).locator('.answer');
    got.push({
      text: await ans.textContent(),
      state: await ans.getAttribute('data-state'),
      chunks: Number(await ans.getAttribute('data-chunks')),
      stats: await cols.nth(i).locator('.stats').textContent(),
    });
  }
  for (const g of got) {
    assert.equal(g.state, 'done', `a column ended as ${g.state}: ${g.stats}`);
    assert.ok(g.text.length > 0, 'a compare answer is empty');
    assert.match(g.stats, /\d+(\.\d+)? tok\/s/);
  }
  assert.notEqual(got[0].text, got[1].text, 'the two adapters answered the same');
  assert.equal(got[0].text, expect.answers[a], `${a}'s column differs from the API answer`);
  assert.equal(got[1].text, expect.answers[b], `${b}'s column differs from the API answer`);
  assert.equal(got[2].text, expect.stack_answer, 'the stack column differs from the API answer');
  seen.compare = got.map((g) => ({ chunks: g.chunks, stats: g.stats }));
  await page.screenshot({ path: path.join(shots, 'playground-screenshot.png') });

  // The adapter list: both adapters, now loaded, with version, rank and targets.
  await page.click('.tab[data-tab="adapters"]');
  for (const [name, rank] of [[a, expect.ranks[a]], [b, expect.ranks[b]]]) {
    const row = page.locator(`#adapters-table tr[data-adapter="${name}"]`);
    await row.waitFor();
    const cells = await row.locator('td').allTextContents();
    assert.equal(cells[0], name);
    assert.equal(cells[1], 'loaded', `${name}: ${cells}`);
    assert.equal(cells[2], String(expect.versions[name]), `${name} version: ${cells}`);
    assert.equal(cells[3], String(rank), `${name} rank: ${cells}`);
    assert.match(cells[5], /q_proj/, `${name} targets: ${cells}`);
  }
  assert.equal(await page.textContent('#adapter-count'), '2');
  await page.screenshot({ path: path.join(shots, 'playground-adapters.png') });

  // A request the server refuses: its JSON error message, in each column and in the banner.
  await page.click('.tab[data-tab="compare"]');
  await page.fill('#max-tokens', '100000');
  await page.click('#compare-run');
  await page.waitForFunction(
    () => [...document.querySelectorAll('.column .answer')].every((e) => e.dataset.state === 'error'),
  );
  const banner = await page.textContent('#error-text');
  assert.match(banner, /^400 Bad Request: .*max_tokens/, banner);
  assert.match(await cols.nth(0).locator('.stats').textContent(), /^400 Bad Request: .*max_tokens/);
  seen.refused = banner;
}

async function authMode(page) {
  const key = process.env.PLAYGROUND_KEY;
  // No key: the page loads (it needs none) and shows the server's 401 message.
  await page.goto(url);
  await page.waitForSelector('#error:not([hidden])');
  const missing = await page.textContent('#error-text');
  assert.match(missing, /^Listing the models failed — 401 Unauthorized: missing API key/);
  assert.equal(await page.textContent('#base-badge'), 'not connected');
  await page.screenshot({ path: path.join(shots, 'playground-401.png') });

  // A wrong key: the server's "invalid API key".
  await page.fill('#api-key', 'not-the-key');
  await page.click('#key-form button[type="submit"]');
  await page.waitForFunction(() => /invalid API key/.test(document.querySelector('#error-text').textContent));

  // The right key: models listed, the error gone, a chat streams.
  await page.fill('#api-key', key);
  await page.click('#key-form button[type="submit"]');
  await page.waitForFunction((base) => document.querySelector('#base-badge').textContent === base, expect.base);
  assert.equal(await page.isVisible('#error'), false);
  await page.waitForSelector('body[data-ready="1"]');
  await page.fill('#temperature', '0');
  await page.fill('#max-tokens', String(expect.max_tokens));
  const c = await chat(page, expect.prompt);
  assert.equal(c.state, 'done', `chat ended as ${c.state}: ${c.stats}`);
  assert.equal(c.text, expect.base_answer);

  // The key survives a reload (localStorage), and the adapter list opens with it.
  await page.reload();
  await page.waitForSelector('body[data-ready="1"]');
  assert.equal(await page.textContent('#base-badge'), expect.base);
  assert.equal(await page.inputValue('#api-key'), key);
  assert.equal(await page.isVisible('#error'), false);
  await page.click('.tab[data-tab="adapters"]');
  await page.locator('#adapters-table tr[data-adapter]').first().waitFor();
  seen.auth = { missing, adapters: await page.locator('#adapters-table tr[data-adapter]').count() };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
});
let failed = false;
let page = null;
try {
  page = await browser.newPage({ viewport: { width: 1280, height: 820 } });
  page.setDefaultTimeout(TIMEOUT_MS);
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // The browser logs the refusals asked for on purpose (400 in open mode, 401 in auth mode)
    // as failed resources; nothing else may show up.
    const asked = mode === 'auth' ? 401 : 400;
    const refused = m.text().startsWith(`Failed to load resource: the server responded with a status of ${asked} `);
    if (m.type() === 'error' && !refused) problems.push(`console: ${m.text()}`);
  });
  page.on('request', (r) => {
    if (!r.url().startsWith(url) && !r.url().startsWith('data:')) problems.push(`external request: ${r.url()}`);
  });
  if (mode === 'open') await openMode(page);
  else if (mode === 'auth') await authMode(page);
  else throw new Error(`unknown mode ${mode}`);
  assert.deepEqual(problems, [], 'the page logged errors or left the server');
  console.log(JSON.stringify(seen));
} catch (e) {
  failed = true;
  console.error(e.stack || String(e));
  if (page) await page.screenshot({ path: path.join(shots, `playground-failed-${mode}.png`) }).catch(() => {});
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
