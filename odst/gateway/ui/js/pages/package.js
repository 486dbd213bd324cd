// One package: manifest and hashes (SHA1 and SHA-512 are what Jamf Pro needs), availability and
// replication progress per site, and its history from the event log.

import { api, get, pkgPath, query } from '../api.js';
import { h, append, replace, messageBox, announce, errorText, fmtBytes, fmtRate, time, copyable, select,
  confirmDialog, debounce, plural, pill } from '../dom.js';
import { summary, packageOf } from '../eventtext.js';
import { siteStatus, wants } from './packages.js';

// Chunk sizes are binary (1 MiB in the ODS protocol): say so exactly.
function chunkSize(n) {
  return n % 1048576 === 0 ? `${n / 1048576} MiB` : fmtBytes(n);
}

const JAMF_WORDS = { in_sync: 'in sync', hash_differs: 'hash differs', no_record: 'no record', no_file: 'record names a file no site holds', failed: 'not written (retrying)' };
const JAMF_KIND = { in_sync: 'ok', hash_differs: 'bad', no_record: 'muted', no_file: 'bad', failed: 'bad' };

const STATUS_KIND = { available: 'ok', downloading: 'info', pending: 'info', failed: 'bad', absent: 'muted', skipped: 'muted' };

export function mount(main, ctx, [name]) {
  const canWrite = ctx.can('write');
  let pkg = null;
  let transfers = [];
  let history = [];
  let jamf = null; // Jamf Pro record state (GET /api/v1/jamf/packages/{name}), null when not configured
  let ac = null;
  let poll = null;

  const crumbs = h('nav', { 'aria-label': 'Breadcrumb', class: 'crumbs' },
    h('ol', {}, h('li', {}, h('a', { href: '#/packages' }, 'Packages')), h('li', { 'aria-current': 'page' }, name)));
  const actions = h('div', { class: 'head-actions' });
  const errors = h('div', {});
  const manifest = h('section', { 'aria-labelledby': 'sec-manifest' });
  const availability = h('section', { 'aria-labelledby': 'sec-availability' });
  const events = h('section', { 'aria-labelledby': 'sec-history' });
  append(main, crumbs, h('div', { class: 'page-head' }, h('h1', { class: 'break' }, name), actions),
    errors, manifest, availability, events);
  manifest.append(h('p', { class: 'loading' }, 'Loading…'));

  function downloadUrl() {
    const s = ctx.state.settings;
    const base = s && s.public_url ? s.public_url.replace(/\/+$/, '') : location.origin;
    const context = (s && s.context) || (ctx.state.site && ctx.state.site.context) || 'CasperShare';
    return `${base}/${context}/Packages/${encodeURIComponent(name)}`;
  }

  function renderActions() {
    if (!pkg || !canWrite) { replace(actions); return; }
    const stages = ctx.stages().includes(pkg.stage) ? ctx.stages() : [pkg.stage, ...ctx.stages()];
    const stageSelect = select(stages, pkg.stage, { id: 'detail-stage' });
    stageSelect.addEventListener('change', async () => {
      stageSelect.disabled = true;
      try {
        pkg = await api('PATCH', pkgPath(name), { stage: stageSelect.value });
        announce(`${name} is now in stage ${pkg.stage}.`, 'success');
      } catch (err) {
        stageSelect.value = pkg.stage;
        announce(`Could not change the stage: ${errorText(err)}`, 'error');
      }
      stageSelect.disabled = false;
    });
    const del = h('button', { type: 'button', class: 'danger' }, 'Delete…');
    del.addEventListener('click', async () => {
      const ok = await confirmDialog({ title: 'Delete package?', confirm: 'Delete', danger: true,
        body: h('p', {}, 'Delete ', h('strong', { class: 'break' }, name), ' from every site? The history stays in the event log.') });
      if (!ok) { del.focus(); return; }
      try {
        await api('DELETE', pkgPath(name));
        announce(`Deleted ${name}.`, 'success');
        ctx.navigate('#/packages');
      } catch (err) {
        announce(`Could not delete ${name}: ${errorText(err)}`, 'error');
      }
    });
    replace(actions, h('label', { for: 'detail-stage' }, 'Stage'), stageSelect, del);
  }

  function renderManifest() {
    if (!pkg) { replace(manifest); return; }
    const chunkList = h('ol', { class: 'chunks mono' });
    const details = h('details', {}, h('summary', {}, `SHA1 of each of the ${plural(pkg.chunks.length, 'chunk')}`), chunkList);
    details.addEventListener('toggle', () => {
      if (details.open && !chunkList.firstChild) {
        const frag = document.createDocumentFragment();
        for (const c of pkg.chunks) frag.append(h('li', {}, c));
        chunkList.append(frag);
      }
    });
    replace(manifest,
      h('h2', { id: 'sec-manifest' }, 'Manifest'),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Size'), h('dd', {}, `${fmtBytes(pkg.size)} (${pkg.size.toLocaleString()} bytes)`),
        h('dt', {}, 'Stage'), h('dd', {}, pill(pkg.stage, `stage-${pkg.stage}`)),
        h('dt', {}, 'Chunks'), h('dd', {}, `${plural(pkg.chunks.length, 'chunk')} of ${chunkSize(pkg.chunk_size)}`),
        h('dt', {}, 'Uploaded'), h('dd', {}, time(pkg.uploaded_at), pkg.uploaded_by ? ` by ${pkg.uploaded_by}` : '',
          pkg.origin ? ` at ${ctx.siteName(pkg.origin)}` : ''),
        h('dt', {}, 'Download URL'), h('dd', {}, copyable(downloadUrl(), 'download URL')),
        jamf ? [h('dt', {}, 'Jamf Pro'), h('dd', { 'data-jamf': jamf.state }, pill(JAMF_WORDS[jamf.state] || jamf.state,
          JAMF_KIND[jamf.state] || 'info'), jamf.record_id ? h('span', { class: 'hint' }, ` record ${jamf.record_id}`) : null,
          jamf.detail ? h('div', { class: 'hint' }, jamf.detail) : null)] : null),
      h('table', { class: 'hashes' },
        h('caption', {}, 'Hashes', h('span', { class: 'hint' }, ' — in Jamf Pro, use SHA-512 (hash type SHA_512)')),
        h('tbody', {},
          h('tr', {}, h('th', { scope: 'row' }, 'SHA1'), h('td', {}, copyable(pkg.sha1, 'SHA1'))),
          h('tr', {}, h('th', { scope: 'row' }, 'SHA-512'), h('td', {}, copyable(pkg.sha512, 'SHA-512', 'mono wrap'))),
          h('tr', {}, h('th', { scope: 'row' }, 'BLAKE3'), h('td', {}, copyable(pkg.blake3, 'BLAKE3'))))),
      details);
  }

  function renderAvailability() {
    if (!pkg) { replace(availability); return; }
    const known = ctx.sites();
    const ids = new Set(known.map((s) => s.site));
    const extra = Object.keys(pkg.availability || {}).filter((s) => !ids.has(s)).map((s) => ({ site: s, name: '', self: false }));
    const rows = known.concat(extra).map((s) => {
      const { status, words } = siteStatus(pkg, s.site, s.accepted);
      const a = (pkg.availability || {})[s.site] || {};
      const t = s.self ? transfers.find((x) => x.name === name && x.blake3 === pkg.blake3) : null;
      let progress = '—';
      const done = t ? t.chunks_done : a.chunks_done;
      const total = t ? t.chunks_total : a.chunks_total;
      if (status !== 'available' && total) {
        const r = t ? t.rate_bytes_per_s : a.rate_bytes_per_s;
        progress = h('div', { class: 'transfer' },
          h('progress', { max: total, value: done, 'aria-label': `Replication to ${s.name || s.site}` }),
          h('span', {}, `${done}/${total} chunks · ${fmtRate(r)}`),
          t && t.sources && t.sources.length ? h('span', { class: 'hint' }, ` from ${t.sources.map((x) => ctx.shortSiteName(x)).join(', ')}`) : null);
      } else if (status === 'available') {
        progress = 'complete';
      }
      return h('tr', {},
        h('th', { scope: 'row' }, s.name || s.site, s.self ? h('span', { class: 'hint' }, ' (this site)') : null,
          s.name ? h('div', { class: 'hint mono' }, s.site) : null),
        h('td', {}, pill(words, STATUS_KIND[status] || 'info')),
        h('td', {}, progress),
        h('td', {}, a.updated_at ? time(a.updated_at) : '—'));
    });
    const held = known.filter((s) => siteStatus(pkg, s.site).status === 'available').length;
    const expected = known.filter((s) => wants(s, pkg) || siteStatus(pkg, s.site).status === 'available').length;
    replace(availability,
      h('h2', { id: 'sec-availability' }, `Availability: ${held}/${plural(expected, 'site')}`),
      expected < known.length ? h('p', { class: 'hint' }, `${known.length - expected === 1 ? 'One site does' : `${known.length - expected} sites do`} not replicate stage ${pkg.stage}.`) : null,
      h('table', {}, h('caption', { class: 'sr-only' }, 'Availability and replication per site'),
        h('thead', {}, h('tr', {}, ['Site', 'Status', 'Replication', 'Updated'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows)));
  }

  function renderHistory() {
    const rows = history.slice().reverse().map((e) => h('tr', {},
      h('td', { class: 'num' }, String(e.position)),
      h('td', {}, time(e.ts)),
      h('td', {}, e.type),
      h('td', {}, summary(e, ctx)),
      h('td', {}, ctx.shortSiteName(e.origin)),
      h('td', { class: 'actor' }, e.actor)));
    replace(events, h('h2', { id: 'sec-history' }, 'History'),
      rows.length ? h('table', {}, h('caption', { class: 'sr-only' }, `Events about ${name}, newest first`),
        h('thead', {}, h('tr', {}, ['#', 'Time', 'Event', 'What', 'Site', 'By'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows)) : h('p', { class: 'empty' }, 'No events about this name.'));
  }

  async function load() {
    if (ac) ac.abort();
    ac = new AbortController();
    const signal = ac.signal;
    const [p, s, ev, jp] = await Promise.allSettled([
      get(pkgPath(name), { signal }), get('/api/v1/state', { signal }),
      get('/api/v1/events' + query({ name, limit: 1000 }), { signal }),
      ctx.state.settings && ctx.state.settings.jamf_configured
        ? get(`/api/v1/jamf/packages/${encodeURIComponent(name)}`, { signal }) : Promise.reject(new Error('no Jamf Pro'))]);
    if (signal.aborted) return;
    const problems = [];
    if (p.status === 'fulfilled') pkg = p.value;
    else if (p.reason.status === 404) { pkg = null; problems.push(messageBox('warning', `There is no package named ${name} now: ${errorText(p.reason)}`)); }
    else problems.push(messageBox('error', `Could not load the package: ${errorText(p.reason)}`));
    if (s.status === 'fulfilled') transfers = s.value.transfers || [];
    jamf = jp.status === 'fulfilled' ? jp.value : null;
    if (ev.status === 'fulfilled') history = ev.value.events;
    else problems.push(messageBox('error', `Could not load the history: ${errorText(ev.reason)}`));
    replace(errors, problems);
    renderActions();
    renderManifest();
    renderAvailability();
    renderHistory();
    clearTimeout(poll);
    const here = pkg && ctx.state.site ? (pkg.availability || {})[ctx.state.site.site] : null;
    if (pkg && here && here.status !== 'available' && here.status !== 'failed') poll = setTimeout(load, 2000);
  }

  const reload = debounce(load, 150);
  const unsubscribe = ctx.feed.subscribe((e) => {
    if (packageOf(e) === name || e.type.startsWith('Peer')) reload();
  });
  load().catch((err) => { if (err.name !== 'AbortError') replace(errors, messageBox('error', errorText(err))); });
  return () => {
    unsubscribe();
    reload.cancel();
    clearTimeout(poll);
    if (ac) ac.abort();
  };
}
