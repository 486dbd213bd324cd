// One package: manifest and hashes (SHA1 and SHA-512 are what Jamf Pro needs), availability and
// replication progress per site, which version each site serves during a replacement (the
// cutover), and its history from the event log.

import { api, get, pkgPath, query, uploadFile } from '../api.js';
import { h, append, replace, messageBox, announce, errorText, fmtBytes, fmtRate, time, copyable, select,
  confirmDialog, debounce, plural, pill } from '../dom.js';
import { summary, packageOf } from '../eventtext.js';
import { siteStatus, wants } from './packages.js';

// Chunk sizes are binary (1 MiB in the ODS protocol): say so exactly.
function chunkSize(n) {
  return n % 1048576 === 0 ? `${n / 1048576} MiB` : fmtBytes(n);
}

const JAMF_WORDS = { in_sync: 'in sync', previous_version: 'previous version until every site swaps', hash_differs: 'hash differs', no_record: 'no record', no_file: 'record names a file no site holds', failed: 'not written (retrying)' };
const JAMF_KIND = { in_sync: 'ok', previous_version: 'info', hash_differs: 'bad', no_record: 'muted', no_file: 'bad', failed: 'bad' };

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

  // A Mac can download the package here only once this site holds a verified copy: before that
  // the URL would answer 404, so the page says how far the copy is instead.
  function downloadCell() {
    const self = ctx.state.site ? ctx.state.site.site : null;
    const here = self ? (pkg.availability || {})[self] : null;
    if (here && here.status === 'available') return copyable(downloadUrl(), 'download URL');
    const accepted = ctx.state.settings ? ctx.state.settings.accepted_stages : null;
    let why = 'this site does not hold a copy yet';
    if (!here && accepted && !accepted.includes(pkg.stage)) why = `this site does not replicate stage ${pkg.stage} (it accepts ${accepted.join(', ')})`;
    else if (here && here.status === 'downloading' && here.chunks_total) why = `this site's copy is at ${Math.floor((100 * here.chunks_done) / here.chunks_total)} %`;
    else if (here && here.status === 'pending') why = 'this site is waiting to download it';
    else if (here && here.status === 'failed') why = `this site could not fetch it${here.detail ? `: ${here.detail}` : ''}`;
    return h('span', { class: 'hint' }, `Not served by this site: ${why}. The URL appears once its copy is verified.`);
  }

  function renderActions() {
    if (!pkg || !canWrite) { replace(actions); return; }
    const stages = ctx.stages().includes(pkg.stage) ? ctx.stages() : [pkg.stage, ...ctx.stages()];
    const stageSelect = select(stages, pkg.stage, { id: 'detail-stage' });
    stageSelect.addEventListener('change', async () => {
      const ok = await confirmDialog({ title: 'Change the stage?', confirm: `Move to ${stageSelect.value}`,
        body: h('p', {}, 'Move ', h('strong', { class: 'break' }, name), ` from ${pkg.stage} to ${stageSelect.value}? `,
          'Sites that accept only some stages fetch or stop serving it accordingly.') });
      if (!ok) { stageSelect.value = pkg.stage; stageSelect.focus(); return; }
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
    replace(actions, h('label', { for: 'detail-stage' }, 'Stage'), stageSelect, replaceButton(), del);
  }

  // Replace: new content under the same name. Every site keeps serving the current version
  // until it holds the new one verified, then swaps; the Availability table shows the cutover.
  let replacing = null;
  function replaceButton() {
    const input = h('input', { type: 'file', hidden: true, 'aria-label': `New content for ${name}` });
    const button = h('button', { type: 'button', class: 'secondary', 'aria-label': `Replace ${name}` },
      replacing ? `Replacing… ${replacing.percent} %` : 'Replace…');
    button.disabled = !!replacing;
    button.addEventListener('click', () => input.click());
    input.addEventListener('change', async () => {
      const file = input.files && input.files[0];
      if (!file) return;
      const ok = await confirmDialog({ title: 'Replace package?', confirm: 'Replace',
        body: h('div', {},
          h('p', {}, 'Replace ', h('strong', { class: 'break' }, name), ` (${fmtBytes(pkg.size)}) with `,
            h('strong', { class: 'break' }, file.name), ` (${fmtBytes(file.size)}), in stage ${pkg.stage}?`),
          h('p', { class: 'hint' }, 'Every site keeps serving the current version until it holds the new one '
            + 'verified, then switches over; Macs never get an error or a mix of both. The history keeps both versions.')) });
      if (!ok) { button.focus(); return; }
      replacing = { percent: 0 };
      renderActions();
      const job = uploadFile({ name, file, replace: true,
        onProgress(loaded, total) {
          const percent = total ? Math.floor((100 * loaded) / total) : 0;
          if (replacing && percent !== replacing.percent) { replacing.percent = percent; renderActions(); }
        } });
      try {
        const result = await job.promise;
        pkg = result.package;
        announce(result.status === 200 ? `${name} already has this content.` : `Replaced ${name}; the sites switch over as they receive it.`, 'success');
      } catch (err) {
        announce(`Could not replace ${name}: ${errorText(err)}`, 'error');
      }
      replacing = null;
      load().catch(() => {});
    });
    return h('span', {}, input, button);
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
        h('dt', {}, 'Download URL'), h('dd', { class: 'download-url' }, downloadCell()),
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
        h('td', {}, servingCell(s.site)),
        h('td', {}, a.updated_at ? time(a.updated_at) : '—'));
    });
    const held = known.filter((s) => siteStatus(pkg, s.site).status === 'available').length;
    const expected = known.filter((s) => wants(s, pkg) || siteStatus(pkg, s.site).status === 'available').length;
    const serving = Object.values(pkg.serving || {});
    const old = serving.filter((b3) => b3 !== pkg.blake3).length;
    replace(availability,
      h('h2', { id: 'sec-availability' }, `Availability: ${held}/${plural(expected, 'site')}`),
      old ? h('p', { class: 'hint', role: 'status' }, `Replacement in progress: ${old === 1 ? 'one site serves' : `${old} sites serve`} `
        + `the previous version until ${old === 1 ? 'it holds' : 'they hold'} this one.`) : null,
      expected < known.length ? h('p', { class: 'hint' }, `${known.length - expected === 1 ? 'One site does' : `${known.length - expected} sites do`} not replicate stage ${pkg.stage}.`) : null,
      h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'Availability and replication per site'),
        h('thead', {}, h('tr', {}, ['Site', 'Status', 'Replication', 'Serves', 'Updated'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows))));
  }

  // Which version a site serves to Macs: this one, or the one it replaces until it has swapped.
  function servingCell(site) {
    const b3 = (pkg.serving || {})[site];
    if (!b3) return '—';
    if (b3 === pkg.blake3) return pill('this version', 'ok');
    return h('span', {}, pill('previous version', 'info'), h('span', { class: 'hint mono' }, ` ${b3.slice(0, 12)}…`));
  }

  function renderHistory() {
    const rows = history.slice().reverse().map((e) => h('tr', {},
      h('td', { class: 'num' }, String(e.position)),
      h('td', {}, time(e.ts)),
      h('td', {}, e.type),
      h('td', { class: 'what' }, summary(e, ctx)),
      h('td', {}, ctx.shortSiteName(e.origin)),
      h('td', { class: 'actor' }, e.actor)));
    replace(events, h('h2', { id: 'sec-history' }, 'History'),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'history' }, h('caption', { class: 'sr-only' }, `Events about ${name}, newest first`),
        h('thead', {}, h('tr', {}, ['#', 'Time', 'Event', 'What', 'Site', 'By'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows))) : h('p', { class: 'empty' }, 'No events about this name.'));
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
    else if (p.reason.status === 404) { pkg = null; problems.push(messageBox('warning', `There is no package named ${name} now: it was deleted, or never uploaded under this name. Its history, if any, is below.`)); }
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
