// Packages: search, sort, stage filter, availability per site at a glance; re-stage and delete.

import { api, get, pkgPath } from '../api.js';
import { h, append, field, select, replace, messageBox, announce, errorText, fmtBytes, time,
  confirmDialog, debounce, plural } from '../dom.js';

// The list's view settings outlive a visit to another page.
const view = { q: '', stage: '', sort: 'name', dir: 1 };

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

function compare(a, b) {
  const k = view.sort;
  const x = a[k];
  const y = b[k];
  let c;
  if (typeof x === 'number' && typeof y === 'number') c = x - y;
  else c = String(x ?? '').localeCompare(String(y ?? ''), undefined, { numeric: true, sensitivity: 'base' });
  if (c === 0 && k !== 'name') c = a.name.localeCompare(b.name);
  return c * view.dir;
}

export function mount(main, ctx) {
  const canWrite = ctx.can('write');
  const stages = ctx.stages();
  let packages = [];
  let loaded = false;
  let ac = null;

  const search = h('input', { type: 'search', value: view.q, autocomplete: 'off', placeholder: 'Part of a name' });
  const stageFilter = select([['', 'All stages'], ...stages], view.stage);
  const count = h('p', { class: 'count', 'aria-live': 'polite' });
  const errors = h('div', {});
  const collisions = h('div', {});
  const body = h('div', { class: 'table-wrap' });

  append(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Packages'),
      canWrite ? h('a', { href: '#/upload', class: 'button' }, 'Upload a package') : null),
    h('div', { class: 'toolbar', role: 'search' },
      field('Search', search).row, field('Stage', stageFilter).row, count),
    errors, collisions, body);

  function visible() {
    const q = view.q.trim().toLowerCase();
    return packages
      .filter((p) => (!q || p.name.toLowerCase().includes(q)) && (!view.stage || p.stage === view.stage))
      .sort(compare);
  }

  function header(key, label) {
    const active = view.sort === key;
    const button = h('button', { type: 'button', class: 'sort' }, label,
      h('span', { class: 'arrow', 'aria-hidden': 'true' }, active ? (view.dir > 0 ? ' ▲' : ' ▼') : ''));
    button.addEventListener('click', () => {
      if (view.sort === key) view.dir = -view.dir;
      else { view.sort = key; view.dir = key === 'uploaded_at' || key === 'size' ? -1 : 1; }
      render();
      body.querySelector(`th[data-key="${key}"] button`).focus();
    });
    return h('th', { scope: 'col', dataset: { key }, 'aria-sort': active ? (view.dir > 0 ? 'ascending' : 'descending') : 'none' }, button);
  }

  function stageControl(pkg) {
    if (!canWrite) return h('span', { class: `pill stage-${pkg.stage}` }, pkg.stage);
    const options = stages.includes(pkg.stage) ? stages : [pkg.stage, ...stages];
    const sel = select(options, pkg.stage, { 'aria-label': `Stage of ${pkg.name}`, class: 'compact' });
    sel.addEventListener('change', async () => {
      const next = sel.value;
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
      packages = packages.filter((p) => p.name !== pkg.name);
      render();
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
      h('td', {}, stageControl(pkg)),
      h('td', { class: 'num', title: `${pkg.size.toLocaleString()} bytes` }, fmtBytes(pkg.size)),
      h('td', { title: pkg.uploaded_by ? `by ${pkg.uploaded_by}` : null }, time(pkg.uploaded_at)),
      h('td', {}, availabilityCell(pkg, ctx)),
      h('td', { class: 'hash' }, h('code', { class: 'mono', title: `SHA1 ${pkg.sha1}` }, pkg.sha1.slice(0, 12) + '…'),
        h('span', { class: 'sr-only' }, ` SHA1 ${pkg.sha1}`)),
      canWrite ? h('td', { class: 'actions' }, deleteButton) : null);
  }

  function render() {
    if (!loaded) return;
    const rows = visible();
    count.textContent = rows.length === packages.length
      ? plural(packages.length, 'package')
      : `${rows.length} of ${plural(packages.length, 'package')}`;
    if (!packages.length) {
      replace(body, h('p', { class: 'empty' }, 'No packages yet. ',
        canWrite ? h('a', { href: '#/upload' }, 'Upload the first one.') : 'An operator or admin can upload them.'));
      return;
    }
    if (!rows.length) {
      replace(body, h('p', { class: 'empty' }, 'No package matches the search or stage filter.'));
      return;
    }
    const focus = focusKey();
    const headers = [...COLUMNS.map(([k, l]) => header(k, l)), h('th', { scope: 'col' }, 'Availability'),
      h('th', { scope: 'col' }, 'SHA1'), canWrite ? h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, 'Actions')) : null];
    replace(body, h('table', { class: 'packages' },
      h('caption', { class: 'sr-only' }, 'Packages, with their stage, size, upload time, availability per site and SHA1'),
      h('thead', {}, h('tr', {}, headers)),
      h('tbody', {}, rows.map(row))));
    restoreFocus(focus);
  }

  // A live refresh rebuilds the table: keep keyboard focus on the same control of the same row.
  function focusKey() {
    const el = document.activeElement;
    const tr = el && body.contains(el) ? el.closest('tr[data-name]') : null;
    return tr ? { name: tr.dataset.name, tag: el.tagName } : null;
  }

  function restoreFocus(key) {
    if (!key) return;
    for (const tr of body.querySelectorAll('tr[data-name]')) {
      if (tr.dataset.name === key.name) {
        const el = tr.querySelector(key.tag.toLowerCase());
        if (el) el.focus();
        return;
      }
    }
  }

  async function load() {
    if (ac) ac.abort();
    ac = new AbortController();
    try {
      const data = await get('/api/v1/packages?limit=10000', { signal: ac.signal });
      packages = data.packages;
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

  // Downloads in progress here report progress without events: poll only while one runs.
  let poll = null;
  function schedulePoll() {
    clearTimeout(poll);
    const busy = packages.some((p) => Object.values(p.availability || {}).some((a) => a.status === 'downloading' || a.status === 'pending'));
    if (busy) poll = setTimeout(load, 3000);
  }

  const reload = debounce(load, 150);
  const unsubscribe = ctx.feed.subscribe((e) => {
    if (e.type.startsWith('Package') || e.type.startsWith('Peer')) reload();
  });
  search.addEventListener('input', debounce(() => { view.q = search.value; render(); }, 120));
  stageFilter.addEventListener('change', () => { view.stage = stageFilter.value; render(); });

  body.append(h('p', { class: 'loading' }, 'Loading packages…'));
  load();
  return () => {
    unsubscribe();
    reload.cancel();
    clearTimeout(poll);
    if (ac) ac.abort();
  };
}
