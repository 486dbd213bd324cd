// Packages: search, sort, stage filter, availability per site at a glance; re-stage and delete.
// A catalogue may hold thousands: the server pages, sorts and filters; live events update the
// rows on screen one by one (GET ?name=X for a changed row), never the whole list.

import { api, get, pkgPath, query } from '../api.js';
import { h, append, field, select, replace, messageBox, announce, errorText, fmtBytes, time,
  confirmDialog, debounce, plural } from '../dom.js';

// The list's view settings outlive a visit to another page.
const view = { q: '', stage: '', sort: 'name', dir: 1, offset: 0 };
const PAGE = 100;

const COLUMNS = [
  ['name', 'Name'], ['stage', 'Stage'], ['size', 'Size'], ['uploaded_at', 'Uploaded'],
];

export const STATUS_WORDS = {
  available: 'available', downloading: 'downloading', pending: 'waiting to download', failed: 'failed',
  withdrawn: 'withdrawn',
};

// A site that does not replicate the package's stage is not missing it.
export function wants(site, pkg) {
  return !site.accepted || site.accepted.includes(pkg.stage);
}

export function siteStatus(pkg, site, accepted = null) {
  const a = pkg.availability ? pkg.availability[site] : null;
  if (!a && accepted && !accepted.includes(pkg.stage)) return { status: 'skipped', words: `not replicated (accepts ${accepted.join(', ')})` };
  if (!a) return { status: 'absent', words: 'not held' };
  // demoted out of the stages a site accepts: not served there; the file goes after a grace period
  if (a.status === 'available' && accepted && !accepted.includes(pkg.stage)) {
    return { status: 'skipped', words: `withdrawn: not served (accepts ${accepted.join(', ')})` };
  }
  let words = STATUS_WORDS[a.status] || a.status;
  if (a.status === 'downloading' && a.chunks_total) words += ` ${Math.floor((100 * a.chunks_done) / a.chunks_total)} %`;
  if (a.status === 'failed' && a.detail) words += `: ${a.detail}`;
  return { status: a.status, words };
}

// "2/3 sites" plus a dot per site; each dot's meaning is also written out for screen readers.
export function availabilityCell(pkg, ctx) {
  const sites = ctx.sites();
  const held = sites.filter((s) => siteStatus(pkg, s.site).status === 'available').length;
  const expected = sites.filter((s) => wants(s, pkg) || siteStatus(pkg, s.site).status === 'available').length;
  const dots = h('ul', { class: 'dots' });
  for (const s of sites) {
    const { status, words } = siteStatus(pkg, s.site, s.accepted);
    const label = `${s.name || s.site}${s.self ? ' (this site)' : ''}: ${words}`;
    dots.append(h('li', { title: label }, h('span', { class: `dot ${status}`, 'aria-hidden': 'true' }),
      h('span', { class: 'sr-only' }, label)));
  }
  return h('div', { class: 'availability' },
    h('span', { class: 'avail-count', title: expected < sites.length ? `${sites.length - expected} more do not replicate stage ${pkg.stage}` : null },
      `${held}/${plural(expected, 'site')}`), dots);
}

// The server's order (SQLite's binary order of names), so a live row lands where a reload would put it.
function cmp(x, y) {
  if (typeof x === 'number' && typeof y === 'number') return x - y;
  const a = String(x ?? '');
  const b = String(y ?? '');
  return a < b ? -1 : a > b ? 1 : 0;
}

function compare(a, b) {
  let c = cmp(a[view.sort], b[view.sort]);
  if (c === 0 && view.sort !== 'name') c = cmp(a.name, b.name);
  return c * view.dir;
}

export function mount(main, ctx) {
  const canWrite = ctx.can('write');
  const stages = ctx.stages();
  let packages = []; // the page on screen, in the server's order
  let total = 0;
  let loaded = false;
  let ac = null;

  const search = h('input', { type: 'search', value: view.q, autocomplete: 'off', placeholder: 'Part of a name' });
  const stageFilter = select([['', 'All stages'], ...stages], view.stage);
  const count = h('p', { class: 'count', 'aria-live': 'polite' });
  const errors = h('div', {});
  const collisions = h('div', {});
  const body = h('div', { class: 'table-wrap' });
  const prev = h('button', { type: 'button', class: 'secondary' }, '‹ Previous');
  const next = h('button', { type: 'button', class: 'secondary' }, 'Next ›');
  const pageInfo = h('span', { class: 'hint' });
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages of packages' }, prev, pageInfo, next);

  append(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Packages'),
      canWrite ? h('a', { href: '#/upload', class: 'button' }, 'Upload a package') : null),
    h('div', { class: 'toolbar', role: 'search' },
      field('Search', search).row, field('Stage', stageFilter).row, count),
    errors, collisions, body, pager);

  function header(key, label, className) {
    const active = view.sort === key;
    const button = h('button', { type: 'button', class: 'sort' }, label,
      h('span', { class: 'arrow', 'aria-hidden': 'true' }, active ? (view.dir > 0 ? ' ▲' : ' ▼') : ''));
    button.addEventListener('click', () => {
      if (view.sort === key) view.dir = -view.dir;
      else { view.sort = key; view.dir = key === 'uploaded_at' || key === 'size' ? -1 : 1; }
      view.offset = 0;
      load().then(() => { const b = body.querySelector(`th[data-key="${key}"] button`); if (b) b.focus(); });
    });
    return h('th', { scope: 'col', class: className, dataset: { key }, 'aria-sort': active ? (view.dir > 0 ? 'ascending' : 'descending') : 'none' }, button);
  }

  function stageControl(pkg) {
    if (!canWrite) return h('span', { class: `pill stage-${pkg.stage}` }, pkg.stage);
    const options = stages.includes(pkg.stage) ? stages : [pkg.stage, ...stages];
    const sel = select(options, pkg.stage, { 'aria-label': `Stage of ${pkg.name}`, class: 'compact' });
    sel.addEventListener('change', async () => {
      const next = sel.value;
      const before = pkg.stage;
      const ok = await confirmDialog({
        title: 'Change the stage?',
        body: h('p', {}, 'Move ', h('strong', { class: 'break' }, pkg.name), ` from ${before} to ${next}? `,
          'Sites that accept only some stages fetch or stop serving it accordingly.'),
        confirm: `Move to ${next}`,
      });
      if (!ok) { sel.value = before; sel.focus(); return; }
      sel.disabled = true;
      try {
        const updated = await api('PATCH', pkgPath(pkg.name), { stage: next });
        Object.assign(pkg, updated);
        announce(`${pkg.name} is now in stage ${next}.`, 'success');
      } catch (err) {
        sel.value = pkg.stage;
        announce(`Could not change the stage of ${pkg.name}: ${errorText(err)}`, 'error');
      }
      sel.disabled = false;
    });
    return sel;
  }

  async function remove(pkg, button) {
    const ok = await confirmDialog({
      title: 'Delete package?',
      body: h('div', {}, h('p', {}, 'Delete ', h('strong', { class: 'break' }, pkg.name), ` (${fmtBytes(pkg.size)}) from every site?`),
        h('p', { class: 'hint' }, 'Every site removes its copy; the history stays in the event log.')),
      confirm: 'Delete', danger: true,
    });
    if (!ok) { button.focus(); return; }
    button.disabled = true;
    try {
      await api('DELETE', pkgPath(pkg.name));
      announce(`Deleted ${pkg.name}.`, 'success');
      dropRow(pkg.name);
      search.focus();
    } catch (err) {
      button.disabled = false;
      announce(`Could not delete ${pkg.name}: ${errorText(err)}`, 'error');
    }
  }

  function row(pkg) {
    const deleteButton = canWrite ? h('button', { type: 'button', class: 'danger small', 'aria-label': `Delete ${pkg.name}` }, 'Delete') : null;
    if (deleteButton) deleteButton.addEventListener('click', () => remove(pkg, deleteButton));
    return h('tr', { dataset: { name: pkg.name } },
      h('th', { scope: 'row', class: 'name' }, h('a', { href: `#/packages/${encodeURIComponent(pkg.name)}` }, pkg.name)),
      h('td', { class: 'stage' }, stageControl(pkg)),
      h('td', { class: 'num size', title: `${pkg.size.toLocaleString()} bytes` }, fmtBytes(pkg.size)),
      h('td', { class: 'uploaded', title: pkg.uploaded_by ? `by ${pkg.uploaded_by}` : null }, time(pkg.uploaded_at)),
      h('td', { class: 'avail' }, availabilityCell(pkg, ctx)),
      h('td', { class: 'hash' }, h('code', { class: 'mono', title: `SHA1 ${pkg.sha1}` }, pkg.sha1.slice(0, 12) + '…'),
        h('span', { class: 'sr-only' }, ` SHA1 ${pkg.sha1}`)),
      canWrite ? h('td', { class: 'actions' }, deleteButton) : null);
  }

  function renderCount() {
    const first = packages.length ? view.offset + 1 : 0;
    const filtered = view.q.trim() || view.stage;
    count.textContent = total <= packages.length && view.offset === 0
      ? `${plural(total, filtered ? 'matching package' : 'package')}`
      : `${first.toLocaleString()}–${(view.offset + packages.length).toLocaleString()} of ${plural(total, filtered ? 'matching package' : 'package')}`;
    pager.hidden = total <= PAGE && view.offset === 0;
    prev.disabled = view.offset === 0;
    next.disabled = view.offset + packages.length >= total;
    pageInfo.textContent = `Page ${Math.floor(view.offset / PAGE) + 1} of ${Math.max(1, Math.ceil(total / PAGE))}`;
  }

  function render() {
    if (!loaded) return;
    renderCount();
    if (!packages.length) {
      const filtered = view.q.trim() || view.stage;
      replace(body, filtered ? h('p', { class: 'empty' }, 'No package matches the search or stage filter.')
        : h('p', { class: 'empty' }, 'No packages yet. ',
          canWrite ? h('a', { href: '#/upload' }, 'Upload the first one.') : 'An operator or admin can upload them.'));
      return;
    }
    const focus = focusKey();
    const headers = [header('name', 'Name'), header('stage', 'Stage', 'stage'), header('size', 'Size', 'size'),
      header('uploaded_at', 'Uploaded', 'uploaded'), h('th', { scope: 'col', class: 'avail' }, 'Availability'),
      h('th', { scope: 'col', class: 'hash' }, 'SHA1'), canWrite ? h('th', { scope: 'col', class: 'col-actions' }, h('span', { class: 'sr-only' }, 'Actions')) : null];
    replace(body, h('table', { class: 'packages' },
      h('caption', { class: 'sr-only' }, 'Packages, with their stage, size, upload time, availability per site and SHA1'),
      h('thead', {}, h('tr', {}, headers)),
      h('tbody', {}, packages.map(row))));
    restoreFocus(focus);
  }

  // A live change redraws one row: keep keyboard focus on the same control of the same row.
  function focusKey() {
    const el = document.activeElement;
    const tr = el && body.contains(el) ? el.closest('tr[data-name]') : null;
    return tr ? { name: tr.dataset.name, tag: el.tagName } : null;
  }

  function restoreFocus(key) {
    if (!key) return;
    const tr = rowEl(key.name);
    const el = tr ? tr.querySelector(key.tag.toLowerCase()) : null;
    if (el) el.focus();
  }

  function rowEl(name) {
    for (const tr of body.querySelectorAll('tr[data-name]')) if (tr.dataset.name === name) return tr;
    return null;
  }

  function listQuery(extra) {
    return query({ limit: PAGE, offset: view.offset, q: view.q.trim(), stage: view.stage, sort: view.sort,
      order: view.dir > 0 ? 'asc' : 'desc', ...extra });
  }

  async function load() {
    if (ac) ac.abort();
    ac = new AbortController();
    try {
      const data = await get('/api/v1/packages' + listQuery(), { signal: ac.signal });
      if (!data.packages.length && view.offset > 0 && data.total > 0) { // the page emptied: go to the last one
        view.offset = Math.max(0, Math.floor((data.total - 1) / PAGE) * PAGE);
        await load();
        return;
      }
      packages = data.packages;
      total = data.total;
      loaded = true;
      replace(errors);
      showCollisions(data.name_collisions || []);
      render();
      schedulePoll();
    } catch (err) {
      if (err.name === 'AbortError') return;
      replace(errors, messageBox('error', `Could not load the packages: ${errorText(err)}`));
    }
  }

  // Spellings that are one name on a Mac (case, Unicode normalisation) but were two packages
  // before names compared that way: one is served, the others are reported until resolved.
  function showCollisions(list) {
    if (!list.length) { replace(collisions); return; }
    replace(collisions, messageBox('warning',
      h('strong', {}, `${plural(list.length, 'name')} spelled more than one way`),
      ' (a Mac does not tell these apart; the first spelling is served, delete the others or re-upload them under another name):',
      h('ul', {}, ...list.map((c) => h('li', {}, `${c.kept} is served; also: `,
        c.others.map((o) => `${o.name} (${o.same_content ? 'same content' : 'other content'})`).join(', '))))));
  }

  function matchesFilter(pkg) {
    const q = view.q.trim().toLowerCase();
    return (!q || pkg.name.toLowerCase().includes(q)) && (!view.stage || pkg.stage === view.stage);
  }

  // Would this row sit on the page on screen? Between its first and last rows, or after the
  // last when the page is the last and not full.
  function belongsHere(pkg) {
    if (!packages.length) return view.offset === 0;
    if (compare(pkg, packages[0]) < 0) return view.offset === 0;
    const last = packages[packages.length - 1];
    return compare(pkg, last) <= 0 || packages.length < PAGE;
  }

  function dropRow(name) {
    const i = packages.findIndex((p) => p.name === name);
    if (i < 0) return;
    packages.splice(i, 1);
    total = Math.max(0, total - 1);
    const tr = rowEl(name);
    if (tr && packages.length) { tr.remove(); renderCount(); } else render();
  }

  // One row from the server (exact name), applied where it belongs: replaced, added or dropped.
  function applyRow(name, pkg) {
    const i = packages.findIndex((p) => p.name === name);
    if (!pkg || !matchesFilter(pkg)) {
      if (i >= 0) dropRow(name);
      return;
    }
    if (i >= 0) {
      packages[i] = pkg;
      const tr = rowEl(name);
      if (tr && compare(pkg, packages[Math.max(0, i - 1)]) >= 0 && (i + 1 >= packages.length || compare(pkg, packages[i + 1]) <= 0)) {
        const focus = focusKey();
        tr.replaceWith(row(pkg));
        restoreFocus(focus);
      } else {
        packages.sort(compare);
        render();
      }
      return;
    }
    total += 1;
    if (belongsHere(pkg)) {
      packages.push(pkg);
      packages.sort(compare);
      if (packages.length > PAGE) packages.pop();
      render();
    } else {
      renderCount();
    }
  }

  // Close to the server's naming.name_key (NFD + case fold) for matching rows to events.
  function foldName(n) { return n.normalize('NFD').toLowerCase().normalize('NFD'); }

  // Names whose rows must be fetched again, gathered over a short while: many events about one
  // package (or a burst about many) cost one small request, never the whole list.
  const stale = new Set();
  async function refreshRows() {
    const names = [...stale].slice(0, 100);
    for (const n of names) stale.delete(n);
    if (!names.length) return;
    try {
      const data = await get('/api/v1/packages' + query({ limit: 100 }) + names.map((n) => `&name=${encodeURIComponent(n)}`).join(''));
      // an event may spell the name otherwise than the row (the server compares as a Mac does)
      const found = new Map(data.packages.map((p) => [foldName(p.name), p]));
      for (const n of names) {
        const pkg = found.get(foldName(n)) || null;
        applyRow(pkg ? pkg.name : n, pkg);
      }
      schedulePoll();
    } catch (err) {
      replace(errors, messageBox('error', `Could not refresh ${names.join(', ')}: ${errorText(err)}`));
    }
    if (stale.size) refreshSoon();
  }
  const refreshSoon = debounce(refreshRows, 150);

  // Downloads in progress here report progress without events: poll just those rows while one runs.
  let poll = null;
  function schedulePoll() {
    clearTimeout(poll);
    const busy = packages.filter((p) => Object.values(p.availability || {}).some((a) => a.status === 'downloading' || a.status === 'pending'));
    if (busy.length) {
      poll = setTimeout(() => { for (const p of busy) stale.add(p.name); refreshRows(); }, 3000);
    }
  }

  const redrawSites = debounce(() => render(), 400);
  const unsubscribe = ctx.feed.subscribe((e) => {
    const name = e.type.startsWith('Package') && e.envelope && e.envelope.event ? e.envelope.event.name : null;
    if (name) { stale.add(name); refreshSoon(); } else if (e.type.startsWith('Peer')) redrawSites();
  });
  search.addEventListener('input', debounce(() => { view.q = search.value; view.offset = 0; load(); }, 200));
  stageFilter.addEventListener('change', () => { view.stage = stageFilter.value; view.offset = 0; load(); });
  prev.addEventListener('click', () => { view.offset = Math.max(0, view.offset - PAGE); load(); });
  next.addEventListener('click', () => { view.offset += PAGE; load(); });

  body.append(h('p', { class: 'loading' }, 'Loading packages…'));
  load();
  return () => {
    unsubscribe();
    refreshSoon.cancel();
    redrawSites.cancel();
    clearTimeout(poll);
    if (ac) ac.abort();
  };
}
