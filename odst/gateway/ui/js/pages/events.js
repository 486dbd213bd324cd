// The event log: every signed event, newest first, filtered by site, type, package, actor and time;
// new events appear as they happen. Each event's signature is checked again in this browser when it
// can (Web Crypto Ed25519); quarantined messages (failed checks, never applied) are listed too.

import { get, query } from '../api.js';
import { h, append, field, select, replace, messageBox, errorText, time, debounce, plural, pill } from '../dom.js';
import { EVENT_TYPES, summary, packageOf } from '../eventtext.js';

const WINDOW = 500; // positions fetched per page
const filters = { origin: '', type: '', name: '', actor: '', from: '', to: '' };

// ---- signature check in the browser

const keys = new Map();
let ed25519 = null; // a promise of whether Web Crypto here knows Ed25519

function bytesFromHex(hex) {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i += 1) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}

function bytesFromBase64(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i += 1) out[i] = bin.charCodeAt(i);
  return out;
}

function browserCanVerify() {
  if (ed25519 === null) {
    ed25519 = (async () => {
      if (!window.isSecureContext || !window.crypto || !crypto.subtle) return false;
      try {
        await crypto.subtle.importKey('raw', new Uint8Array(32), { name: 'Ed25519' }, false, ['verify']);
        return true;
      } catch {
        return false;
      }
    })();
  }
  return ed25519;
}

async function keyFor(hex) {
  if (!keys.has(hex)) keys.set(hex, crypto.subtle.importKey('raw', bytesFromHex(hex), { name: 'Ed25519' }, false, ['verify']));
  return keys.get(hex);
}

// 'valid' | 'invalid' | 'mismatch' | 'unchecked' (no key or no Web Crypto Ed25519 here)
async function checkSignature(item, publicKeyHex) {
  if (!publicKeyHex || !item.signed || !(await browserCanVerify())) return 'unchecked';
  try {
    const bytes = bytesFromBase64(item.signed);
    const signature = bytes.slice(0, 64);
    const message = bytes.slice(64);
    const ok = await crypto.subtle.verify({ name: 'Ed25519' }, await keyFor(publicKeyHex), signature, message);
    if (!ok) return 'invalid';
    // The envelope shown must be the one that was signed.
    const signed = JSON.parse(new TextDecoder().decode(message));
    const shown = item.envelope;
    const same = signed.id === shown.id && signed.origin === shown.origin && signed.seq === shown.seq
      && signed.prev === shown.prev && signed.ts === shown.ts && signed.actor === shown.actor
      && JSON.stringify(signed.event) === JSON.stringify(shown.event);
    return same ? 'valid' : 'mismatch';
  } catch {
    return 'invalid';
  }
}

const SIGNATURE = {
  valid: ['✓ valid', 'ok', 'Signature valid: verified by the server before the event was applied, and checked again in this browser with the origin site’s public key.'],
  unchecked: ['✓ verified', 'ok', 'Signature verified by the server before the event was applied (this browser cannot re-check it: it needs HTTPS or localhost and Ed25519 support).'],
  invalid: ['✗ invalid', 'bad', 'The signature did NOT verify in this browser against the origin site’s public key.'],
  mismatch: ['✗ mismatch', 'bad', 'The signed bytes differ from the envelope the server shows.'],
  pending: ['checking…', 'muted', 'Checking the signature in this browser…'],
};

function signatureCell(status) {
  const [text, kind, explanation] = SIGNATURE[status] || SIGNATURE.unchecked;
  return h('span', { title: explanation }, pill(text, kind), h('span', { class: 'sr-only' }, ` ${explanation}`));
}

// ---- page

export function mount(main, ctx) {
  let items = []; // ascending positions
  let from = 0; // positions after this one are loaded
  const status = new Map(); // position -> signature status
  const fresh = new Set();
  let ac = null;
  let quarantineTimer = null;

  const siteOptions = () => [['', 'All sites'], ...ctx.sites().map((s) => [s.site, s.name ? `${s.name} (${s.site})` : s.site])];
  const origin = select(siteOptions(), filters.origin);
  const type = select([['', 'All types'], ...EVENT_TYPES], filters.type);
  const name = h('input', { type: 'search', value: filters.name, autocomplete: 'off', placeholder: 'Exact package name' });
  const actor = h('input', { type: 'search', value: filters.actor, autocomplete: 'off', placeholder: 'e.g. user:alice' });
  const fromInput = h('input', { type: 'datetime-local', value: filters.from, step: 1 });
  const toInput = h('input', { type: 'datetime-local', value: filters.to, step: 1 });
  const reset = h('button', { type: 'reset', class: 'secondary' }, 'Clear filters');
  const form = h('form', { class: 'filters', 'aria-label': 'Filter events' },
    field('Site', origin).row, field('Type', type).row, field('Package', name).row, field('Actor', actor).row,
    field('From', fromInput).row, field('To', toInput).row, h('div', { class: 'actions' }, reset));
  const info = h('p', { class: 'count', 'aria-live': 'polite' });
  const older = h('button', { type: 'button', class: 'secondary' }, 'Load older events');
  const errors = h('div', {});
  const body = h('div', { class: 'table-wrap' });
  const quarantine = h('section', { 'aria-labelledby': 'sec-quarantine' });
  append(main, h('h1', {}, 'Event log'),
    h('p', { class: 'hint' }, 'Every change is a signed event, chained per site. Newest first; new events appear as they happen.'),
    form, errors, quarantine, h('div', { class: 'log-head' }, info), body, h('div', { class: 'actions' }, older));

  const publicKeys = () => {
    const map = new Map();
    if (ctx.state.site) map.set(ctx.state.site.site, ctx.state.site.public_key);
    for (const p of ctx.state.peers) map.set(p.site, p.public_key);
    return map;
  };

  function verifyAll(list) {
    const pk = publicKeys();
    for (const item of list) {
      if (status.has(item.position)) continue;
      status.set(item.position, 'pending');
      checkSignature(item, pk.get(item.origin)).then((s) => {
        status.set(item.position, s);
        const cell = body.querySelector(`tr[data-position="${item.position}"] td.sig`);
        if (cell) replace(cell, signatureCell(s));
      });
    }
  }

  function serverFilterMatches(item) {
    return (!filters.type || item.type === filters.type) && (!filters.origin || item.origin === filters.origin)
      && (!filters.name || packageOf(item) === filters.name || (item.envelope && item.envelope.event && item.envelope.event.name === filters.name));
  }

  function clientFilterMatches(item) {
    if (filters.actor && !item.actor.toLowerCase().includes(filters.actor.toLowerCase())) return false;
    if (filters.from && item.ts < new Date(filters.from).getTime()) return false;
    if (filters.to && item.ts > new Date(filters.to).getTime()) return false;
    return true;
  }

  function detailRow(item) {
    const envelope = JSON.stringify(item.envelope, null, 2);
    return h('tr', { class: 'detail' }, h('td', { colspan: 8 },
      h('p', {}, `Stream ${item.stream} #${item.stream_seq} · subject ${item.subject} · origin sequence ${item.seq} · event id ${item.id}`),
      h('p', {}, 'Previous event’s BLAKE3 (chain): ', h('code', { class: 'mono' }, item.envelope.prev || '(first event of this site)')),
      h('pre', { class: 'envelope' }, envelope),
      h('p', { class: 'hint' }, `Signed bytes (base64, ${Math.floor((item.signed.length * 3) / 4)} bytes): 64-byte ed25519 signature followed by this envelope as canonical JSON.`)));
  }

  function row(item) {
    const toggle = h('button', { type: 'button', class: 'small secondary', 'aria-expanded': 'false', 'aria-label': `Details of event ${item.position}` }, 'Details');
    const tr = h('tr', { class: fresh.has(item.position) ? 'fresh' : null, dataset: { position: item.position, type: item.type } },
      h('td', { class: 'num' }, String(item.position)),
      h('td', {}, time(item.ts)),
      h('td', {}, ctx.shortSiteName(item.origin)),
      h('td', {}, item.type),
      h('td', { class: 'what' }, packageOf(item)
        ? h('a', { href: `#/packages/${encodeURIComponent(packageOf(item))}` }, summary(item, ctx)) : summary(item, ctx)),
      h('td', { class: 'actor' }, item.actor),
      h('td', { class: 'sig' }, signatureCell(status.get(item.position) || 'pending')),
      h('td', {}, toggle));
    toggle.addEventListener('click', () => {
      const open = toggle.getAttribute('aria-expanded') === 'true';
      toggle.setAttribute('aria-expanded', String(!open));
      if (open) tr.nextSibling.remove();
      else tr.after(detailRow(item));
    });
    return tr;
  }

  function render() {
    const shown = items.filter(clientFilterMatches).reverse();
    const range = items.length ? `positions ${from + 1}–${items[items.length - 1].position}` : `positions after ${from}`;
    info.textContent = `${plural(shown.length, 'event')} shown (${range} searched).`;
    older.hidden = from === 0;
    if (!shown.length) {
      replace(body, h('p', { class: 'empty' }, 'No events match these filters in the loaded range.',
        from > 0 ? ' Load older events to search further back.' : ''));
      return;
    }
    replace(body, h('table', { class: 'events' },
      h('caption', { class: 'sr-only' }, 'Events, newest first'),
      h('thead', {}, h('tr', {}, ['#', 'Time', 'Site', 'Type', 'What', 'Actor', 'Signature'].map((c) => h('th', { scope: 'col' }, c)),
        h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, 'Details')))),
      h('tbody', {}, shown.map(row))));
    verifyAll(shown);
  }

  function params(after, limit) {
    return query({ after, limit, type: filters.type, origin: filters.origin, name: filters.name });
  }

  async function load() {
    if (ac) ac.abort();
    ac = new AbortController();
    try {
      const head = await get('/api/v1/events?limit=1', { signal: ac.signal });
      from = Math.max(0, head.last_position - WINDOW);
      const data = await get('/api/v1/events' + params(from, 1000), { signal: ac.signal });
      items = data.events;
      replace(errors);
      render();
    } catch (err) {
      if (err.name === 'AbortError') return;
      replace(errors, messageBox('error', `Could not load the event log: ${errorText(err)}`));
    }
  }

  older.addEventListener('click', async () => {
    const until = from;
    const start = Math.max(0, from - WINDOW);
    older.disabled = true;
    try {
      const data = await get('/api/v1/events' + params(start, 1000));
      const seen = new Set(items.map((i) => i.position));
      items = data.events.filter((e) => e.position <= until && !seen.has(e.position)).concat(items);
      from = start;
      render();
    } catch (err) {
      replace(errors, messageBox('error', `Could not load older events: ${errorText(err)}`));
    }
    older.disabled = false;
  });

  async function loadQuarantine() {
    clearTimeout(quarantineTimer);
    try {
      const q = await get('/api/v1/quarantine?limit=1000');
      const rows = q.quarantine.map((m) => h('tr', {},
        h('td', {}, `${m.stream} #${m.stream_seq}`),
        h('td', {}, ctx.shortSiteName(m.origin)),
        h('td', { class: 'mono' }, m.subject),
        h('td', {}, m.kind),
        h('td', {}, m.reason),
        h('td', {}, pill('✗ failed', 'bad'), h('span', { class: 'sr-only' }, ' not applied'))));
      replace(quarantine, h('h2', { id: 'sec-quarantine' }, `Quarantined messages (${q.count})`),
        rows.length ? [h('p', { class: 'hint' }, 'These failed their signature or chain check, or came from a removed site: recorded, never applied.'),
          h('div', { class: 'table-wrap' }, h('table', { class: 'quarantine' }, h('caption', { class: 'sr-only' }, 'Quarantined messages'),
            h('thead', {}, h('tr', {}, ['Stream', 'Site', 'Subject', 'Kind', 'Reason', 'Signature'].map((c) => h('th', { scope: 'col' }, c)))),
            h('tbody', {}, rows)))]
          : h('p', { class: 'hint' }, 'None: every message received so far passed its signature and chain checks.'));
    } catch (err) {
      replace(quarantine, messageBox('error', `Could not read the quarantine: ${errorText(err)}`));
    }
    // A bad message is not an event, so nothing announces it: look again now and then.
    quarantineTimer = setTimeout(loadQuarantine, 15000);
  }

  // The shared live feed is brief (no signed bytes, no chunk list): this page shows and checks
  // the signature, so it fetches the whole event of each one it adds.
  let queue = Promise.resolve();
  async function whole(item) {
    if (!item.brief) return item;
    const data = await get('/api/v1/events' + query({ after: item.position - 1, limit: 1 }));
    return data.events.find((e) => e.position === item.position) || null;
  }

  const unsubscribe = ctx.feed.subscribe((brief) => {
    if (!serverFilterMatches(brief)) return;
    const fetching = whole(brief);
    // In order of position: a later event must not overtake an earlier one being fetched.
    queue = queue.then(() => fetching).then((item) => { if (item) add(item); })
      .catch((err) => replace(errors, messageBox('error', `Could not load event ${brief.position}: ${errorText(err)}`)));
  });

  function add(item) {
    if (!serverFilterMatches(item) || items.some((i) => i.position === item.position)) return;
    if (items.length && item.position < items[items.length - 1].position) return;
    items.push(item);
    fresh.add(item.position);
    const tbody = body.querySelector('tbody');
    if (!tbody) { render(); return; }
    if (!clientFilterMatches(item)) return;
    // Prepend: rows already on screen (and any opened details) stay as they are.
    tbody.prepend(row(item));
    const shown = tbody.querySelectorAll('tr[data-position]').length;
    info.textContent = `${plural(shown, 'event')} shown (positions ${from + 1}–${item.position} searched).`;
    verifyAll([item]);
  }

  const apply = () => {
    Object.assign(filters, { origin: origin.value, type: type.value, name: name.value.trim(), actor: actor.value.trim(),
      from: fromInput.value, to: toInput.value });
  };
  const refetch = debounce(() => { apply(); load(); }, 250);
  for (const el of [origin, type]) el.addEventListener('change', refetch);
  name.addEventListener('input', refetch);
  for (const el of [actor, fromInput, toInput]) el.addEventListener('input', debounce(() => { apply(); render(); }, 150));
  form.addEventListener('submit', (e) => e.preventDefault());
  form.addEventListener('reset', () => setTimeout(() => { apply(); load(); }, 0));

  body.append(h('p', { class: 'loading' }, 'Loading events…'));
  load();
  loadQuarantine();
  return () => {
    unsubscribe();
    refetch.cancel();
    clearTimeout(quarantineTimer);
    if (ac) ac.abort();
  };
}
