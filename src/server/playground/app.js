// loraplex playground: chat, side-by-side compare and the adapter list, against this server's
// own /v1 API. Plain JavaScript, no dependencies, no external requests (the server's
// Content-Security-Policy forbids them anyway).
'use strict';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const KEY_STORE = 'loraplex.apiKey';
const MAX_COLUMNS = 3;

/** What the server serves: the base id, adapter names, merged mode. */
const served = { base: null, adapters: [], merged: false };
/** Every target picker on the page, refreshed when the model list changes. */
const pickers = [];

// ---------------------------------------------------------------- API

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORE) || '';
}

function headers(json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The server's error message (`{"error": {"message"}}`), else the status line. */
async function failure(resp) {
  let message = '';
  try {
    const body = await resp.text();
    try {
      const j = JSON.parse(body);
      message = (j && j.error && j.error.message) || body;
    } catch (_) {
      message = body;
    }
  } catch (_) { /* no body */ }
  const status = `${resp.status}${resp.statusText ? ' ' + resp.statusText : ''}`;
  let text = message ? `${status}: ${message}` : status;
  if (resp.status === 401) text += ' (enter the key in the API key field at the top)';
  return new ApiFailure(resp.status, text);
}

async function getJson(path) {
  let resp;
  try {
    resp = await fetch(path, { headers: headers(false) });
  } catch (e) {
    throw new ApiFailure(0, `the server cannot be reached (${e.message})`);
  }
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

/**
 * POSTs a streamed chat completion and reads its server-sent events as they arrive.
 * `onUpdate(text, stats)` runs after each chunk. Resolves to the final stats.
 */
async function streamChat(body, signal, onUpdate) {
  const stats = { text: '', chunks: 0, tokens: 0, t0: performance.now(), tFirst: null, tLast: null, finish: null };
  let resp;
  try {
    resp = await fetch('/v1/chat/completions', {
      method: 'POST',
      headers: headers(true),
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiFailure(0, `the server cannot be reached (${e.message})`);
  }
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let done = false;
  const handle = (event) => {
    const data = event.split('\n')
      .filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).replace(/^ /, ''))
      .join('\n');
    if (!data) return;
    if (data === '[DONE]') { done = true; return; }
    const obj = JSON.parse(data);
    if (obj.error) throw new ApiFailure(500, `the stream failed: ${obj.error.message}`);
    if (obj.usage) stats.tokens = obj.usage.completion_tokens;
    const choice = obj.choices && obj.choices[0];
    if (!choice) return;
    const piece = choice.delta && choice.delta.content;
    if (piece) {
      const now = performance.now();
      if (stats.tFirst === null) stats.tFirst = now;
      stats.tLast = now;
      stats.text += piece;
      stats.chunks += 1;
    }
    if (choice.finish_reason) stats.finish = choice.finish_reason;
    onUpdate(stats.text, stats);
  };
  while (!done) {
    const { value, done: eof } = await reader.read();
    if (eof) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r/g, '');
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      handle(event);
    }
  }
  if (!done) throw new ApiFailure(0, 'the stream ended before [DONE]');
  stats.tLast = stats.tLast || performance.now();
  if (!stats.tokens) stats.tokens = stats.chunks;
  return stats;
}

/**
 * "12 tokens · 34.5 tok/s · first token 80 ms · stop": tok/s over the whole answer, from the
 * request to its last token (the time to the first token is shown on its own).
 */
function describe(stats, running) {
  const end = running ? performance.now() : stats.tLast || performance.now();
  const tokens = running ? stats.chunks : stats.tokens;
  const parts = [`${tokens} token${tokens === 1 ? '' : 's'}`];
  const seconds = (end - stats.t0) / 1000;
  parts.push(tokens > 0 && seconds > 0 ? `${(tokens / seconds).toFixed(1)} tok/s` : '– tok/s');
  if (stats.tFirst !== null) parts.push(`first token ${Math.round(stats.tFirst - stats.t0)} ms`);
  if (!running && stats.finish) parts.push(stats.finish);
  return parts.join(' · ');
}

function sampling() {
  const body = {};
  const t = parseFloat($('#temperature').value);
  if (Number.isFinite(t)) body.temperature = t;
  const m = parseInt($('#max-tokens').value, 10);
  if (Number.isFinite(m)) body.max_tokens = m;
  return body;
}

// ---------------------------------------------------------------- errors

function showError(message) {
  $('#error-text').textContent = message;
  $('#error').hidden = false;
}

function clearError() {
  $('#error').hidden = true;
  $('#error-text').textContent = '';
}

// ---------------------------------------------------------------- target picker

/**
 * A picker of what answers: the base, one adapter, or a weighted stack of adapters (one weight
 * per adapter; 0 leaves it out). `initial` is 'base', 'adapter:NAME' or 'stack'.
 */
function makePicker(root, initial) {
  root.classList.add('target');
  const select = document.createElement('select');
  const stack = document.createElement('div');
  stack.className = 'stack';
  stack.hidden = true;
  root.append(select, stack);
  const weights = new Map();
  const picker = { root, select, wanted: initial };

  picker.refresh = () => {
    const keep = select.value || picker.wanted;
    select.replaceChildren();
    const add = (value, label) => {
      const o = document.createElement('option');
      o.value = value;
      o.textContent = label;
      select.append(o);
    };
    if (served.base) add('base', served.merged ? `${served.base} (merged)` : `base · ${served.base}`);
    for (const name of served.adapters) add(`adapter:${name}`, `adapter · ${name}`);
    if (served.adapters.length > 0) add('stack', 'weighted stack…');
    const values = $$('option', select).map((o) => o.value);
    select.value = values.includes(keep) ? keep : values[0] || '';
    stack.replaceChildren();
    for (const name of served.adapters) {
      const label = document.createElement('label');
      const input = document.createElement('input');
      input.type = 'number';
      input.step = '0.1';
      input.min = '-100';
      input.max = '100';
      input.value = weights.has(name) ? weights.get(name) : '0';
      input.dataset.adapter = name;
      input.addEventListener('input', () => weights.set(name, input.value));
      const span = document.createElement('span');
      span.textContent = name;
      label.append(input, span);
      stack.append(label);
    }
    stack.hidden = select.value !== 'stack';
  };
  select.addEventListener('change', () => {
    picker.wanted = select.value;
    stack.hidden = select.value !== 'stack';
  });

  /** The request fields and a label for the current choice; throws when a stack is empty. */
  picker.get = () => {
    const v = select.value;
    if (!v) throw new ApiFailure(0, 'no model is available (is the API key right?)');
    if (v === 'base') return { body: { model: served.base }, label: served.base };
    if (v.startsWith('adapter:')) {
      const name = v.slice('adapter:'.length);
      return { body: { model: name }, label: name };
    }
    const adapters = $$('input', stack)
      .map((i) => ({ name: i.dataset.adapter, weight: parseFloat(i.value) }))
      .filter((a) => Number.isFinite(a.weight) && a.weight !== 0);
    if (adapters.length === 0) {
      throw new ApiFailure(0, 'a weighted stack needs at least one adapter with a non-zero weight');
    }
    const label = adapters.map((a) => `${a.name}×${a.weight}`).join(' + ');
    return { body: { model: served.base, adapters }, label };
  };
  pickers.push(picker);
  picker.refresh();
  return picker;
}

// ---------------------------------------------------------------- models and adapters

async function loadModels() {
  const badge = $('#base-badge');
  try {
    const list = await getJson('/v1/models');
    const data = list.data || [];
    const base = data.find((m) => !m.parent) || data[0];
    served.base = base ? base.id : null;
    served.adapters = data.filter((m) => m.parent).map((m) => m.id).sort();
    served.merged = data.length === 1 && base && base.root && base.root !== base.id;
    badge.textContent = served.base || 'no model';
    badge.classList.remove('offline');
    $('#adapter-count').textContent = served.merged ? '' : String(served.adapters.length);
  } catch (e) {
    served.base = null;
    served.adapters = [];
    badge.textContent = 'not connected';
    badge.classList.add('offline');
    $('#adapter-count').textContent = '';
    showError(`Listing the models failed — ${e.message}`);
  }
  pickers.forEach((p) => p.refresh());
}

function formatBytes(b) {
  if (b === null || b === undefined) return '–';
  if (b >= 1e6) return `${(b / 1e6).toFixed(1)} MB`;
  if (b >= 1e3) return `${(b / 1e3).toFixed(1)} kB`;
  return `${b} B`;
}

function formatAgo(unix) {
  if (!unix) return 'never';
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(unix * 1000).toLocaleString();
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text === null || text === undefined ? '–' : String(text);
  if (cls) td.className = cls;
  return td;
}

/** The adapter table from GET /v1/adapters, or names only from /v1/models when refused. */
async function loadAdapters() {
  const tbody = $('#adapters-table tbody');
  const note = $('#adapters-note');
  let rows;
  try {
    rows = (await getJson('/v1/adapters')).data || [];
    note.textContent = 'Rank, alpha, targets and size are known once an adapter has been loaded.';
  } catch (e) {
    if (![401, 403, 404, 405].includes(e.status)) {
      showError(`Listing the adapters failed — ${e.message}`);
      return;
    }
    try {
      const models = (await getJson('/v1/models')).data || [];
      rows = models.filter((m) => m.parent).map((m) => ({ name: m.id }));
      note.textContent = `Names only (from /v1/models): /v1/adapters answered ${e.message}`;
    } catch (e2) {
      showError(`Listing the adapters failed — ${e2.message}`);
      return;
    }
  }
  rows.sort((a, b) => a.name.localeCompare(b.name));
  tbody.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell(served.merged ? 'merged mode: adapters are folded into the base' : 'no adapters registered');
    td.colSpan = 9;
    td.className = 'empty';
    tr.append(td);
    tbody.append(tr);
    return;
  }
  for (const a of rows) {
    const tr = document.createElement('tr');
    tr.dataset.adapter = a.name;
    const state = cell(a.state, `state ${a.state || ''}`);
    tr.append(
      cell(a.name, 'name'), state, cell(a.version), cell(a.rank), cell(a.alpha),
      cell(a.targets ? a.targets.join(', ') : null, 'targets'), cell(formatBytes(a.bytes)),
      cell(a.requests), cell(a.state ? formatAgo(a.last_used) : null),
    );
    tbody.append(tr);
  }
}

// ---------------------------------------------------------------- chat

// `epoch` changes on Clear, so an answer still ending after it leaves the new history alone.
const chat = { history: [], controller: null, epoch: 0 };

function chatBubble(role, label) {
  const log = $('#chat-log');
  const empty = $('.empty', log);
  if (empty) empty.remove();
  const msg = document.createElement('div');
  msg.className = `msg ${role}`;
  const who = document.createElement('div');
  who.className = 'who';
  who.textContent = label;
  const answer = document.createElement('pre');
  answer.className = 'answer';
  msg.append(who, answer);
  if (role === 'assistant') {
    const stats = document.createElement('div');
    stats.className = 'stats';
    msg.append(stats);
  }
  log.append(msg);
  log.scrollTop = log.scrollHeight;
  return msg;
}

async function sendChat(ev) {
  ev.preventDefault();
  if (chat.controller) return;
  const input = $('#chat-input');
  const text = input.value.trim();
  if (!text) return;
  let target;
  try {
    target = chat.picker.get();
  } catch (e) {
    showError(e.message);
    return;
  }
  clearError();
  input.value = '';
  chat.history.push({ role: 'user', content: text });
  $('.answer', chatBubble('user', 'you')).textContent = text;
  const msg = chatBubble('assistant', target.label);
  const answer = $('.answer', msg);
  const statsEl = $('.stats', msg);
  answer.dataset.state = 'streaming';
  msg.classList.add('streaming');
  chat.controller = new AbortController();
  $('#chat-send').disabled = true;
  $('#chat-stop').disabled = false;
  const body = { ...target.body, ...sampling(), messages: chat.history.slice() };
  const epoch = chat.epoch;
  const history = (f) => { if (epoch === chat.epoch) f(chat.history); };
  let stats = null;
  try {
    stats = await streamChat(body, chat.controller.signal, (t, s) => {
      stats = s;
      answer.textContent = t;
      answer.dataset.chunks = String(s.chunks);
      statsEl.textContent = describe(s, true);
      $('#chat-log').scrollTop = $('#chat-log').scrollHeight;
    });
    answer.dataset.state = 'done';
    answer.dataset.tokens = String(stats.tokens);
    statsEl.textContent = describe(stats, false);
    history((h) => h.push({ role: 'assistant', content: stats.text }));
  } catch (e) {
    if (e.name === 'AbortError') {
      answer.dataset.state = 'stopped';
      statsEl.textContent = `${stats ? describe(stats, false) + ' · ' : ''}stopped`;
      const partial = stats && stats.text;
      history((h) => (partial ? h.push({ role: 'assistant', content: partial }) : h.pop()));
    } else {
      answer.dataset.state = 'error';
      msg.classList.add('failed');
      statsEl.textContent = e.message;
      history((h) => h.pop());
      showError(e.message);
    }
  } finally {
    msg.classList.remove('streaming');
    chat.controller = null;
    $('#chat-send').disabled = false;
    $('#chat-stop').disabled = true;
  }
}

// ---------------------------------------------------------------- compare

const compare = { columns: [], controllers: [] };

function addColumn(initial) {
  if (compare.columns.length >= MAX_COLUMNS) return;
  const node = $('#column-template').content.firstElementChild.cloneNode(true);
  $('#compare-columns').append(node);
  const col = { node, picker: makePicker($('.target', node), initial) };
  $('.remove', node).addEventListener('click', () => {
    if (compare.columns.length <= 2) return;
    node.remove();
    compare.columns = compare.columns.filter((c) => c !== col);
    pickers.splice(pickers.indexOf(col.picker), 1);
    updateColumnButtons();
  });
  compare.columns.push(col);
  updateColumnButtons();
}

function updateColumnButtons() {
  const n = compare.columns.length;
  $('#compare-add').disabled = n >= MAX_COLUMNS;
  $('#compare-columns').dataset.columns = String(n);
  compare.columns.forEach((c) => { $('.remove', c.node).hidden = n <= 2; });
}

async function runColumn(col, prompt, signal) {
  const answer = $('.answer', col.node);
  const statsEl = $('.stats', col.node);
  col.node.classList.remove('failed');
  answer.textContent = '';
  statsEl.textContent = '';
  delete answer.dataset.chunks;
  delete answer.dataset.tokens;
  answer.dataset.state = 'streaming';
  let stats = null;
  try {
    const target = col.picker.get();
    const body = { ...target.body, ...sampling(), messages: [{ role: 'user', content: prompt }] };
    stats = await streamChat(body, signal, (t, s) => {
      stats = s;
      answer.textContent = t;
      answer.dataset.chunks = String(s.chunks);
      statsEl.textContent = describe(s, true);
    });
    answer.dataset.state = 'done';
    answer.dataset.tokens = String(stats.tokens);
    statsEl.textContent = describe(stats, false);
  } catch (e) {
    if (e.name === 'AbortError') {
      answer.dataset.state = 'stopped';
      statsEl.textContent = `${stats ? describe(stats, false) + ' · ' : ''}stopped`;
    } else {
      answer.dataset.state = 'error';
      col.node.classList.add('failed');
      statsEl.textContent = e.message;
      showError(e.message);
    }
  }
}

async function runCompare(ev) {
  ev.preventDefault();
  if (compare.controllers.length > 0) return;
  const prompt = $('#compare-input').value.trim();
  if (!prompt) return;
  clearError();
  compare.controllers = compare.columns.map(() => new AbortController());
  $('#compare-run').disabled = true;
  $('#compare-stop').disabled = false;
  try {
    await Promise.all(compare.columns.map((c, i) => runColumn(c, prompt, compare.controllers[i].signal)));
  } finally {
    compare.controllers = [];
    $('#compare-run').disabled = false;
    $('#compare-stop').disabled = true;
  }
}

// ---------------------------------------------------------------- wiring

function showTab(name) {
  $$('.tab').forEach((t) => t.classList.toggle('active', t.dataset.tab === name));
  $$('.panel').forEach((p) => { p.hidden = p.id !== `tab-${name}`; });
  if (name === 'adapters') loadAdapters();
}

function submitOnEnter(textarea) {
  textarea.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      textarea.form.requestSubmit();
    }
  });
}

document.addEventListener('DOMContentLoaded', () => {
  $('#api-key').value = apiKey();
  $('#key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('#api-key').value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    clearError();
    loadModels().then(() => { if (!$('#tab-adapters').hidden) loadAdapters(); });
  });
  $('#key-clear').addEventListener('click', () => {
    $('#api-key').value = '';
    $('#key-form').requestSubmit();
  });
  $('#error-close').addEventListener('click', clearError);
  $$('.tab').forEach((t) => t.addEventListener('click', () => showTab(t.dataset.tab)));

  chat.picker = makePicker($('#chat-target'), 'base');
  $('#chat-form').addEventListener('submit', sendChat);
  $('#chat-stop').addEventListener('click', () => chat.controller && chat.controller.abort());
  $('#chat-clear').addEventListener('click', () => {
    if (chat.controller) chat.controller.abort();
    chat.epoch += 1;
    chat.history = [];
    $('#chat-log').replaceChildren();
  });
  submitOnEnter($('#chat-input'));

  $('#compare-form').addEventListener('submit', runCompare);
  $('#compare-stop').addEventListener('click', () => compare.controllers.forEach((c) => c.abort()));
  $('#compare-add').addEventListener('click', () => addColumn('base'));
  $('#adapters-refresh').addEventListener('click', loadAdapters);
  submitOnEnter($('#compare-input'));

  loadModels().then(() => {
    // Default columns: the base next to the first adapter.
    addColumn('base');
    addColumn(served.adapters.length > 0 ? `adapter:${served.adapters[0]}` : 'base');
    document.body.dataset.ready = '1';
  });
});
