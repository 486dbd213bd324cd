// Network page, bandwidth block (issue 14): per link the limit in force now, the window state and
// the measured rate; the network-wide default, local networks, download caps and urgent packages.
// Admins set link limits, timetables, local networks and caps; operators mark packages urgent.

import { api, get } from '../api.js';
import { h, field, select, replace, messageBox, announce, errorText, pill, plural } from '../dom.js';

const STATE_KIND = { open: 'ok', local: 'ok', urgent: 'ok', limited: 'info', paused: 'bad' };
const MB = 1e6;

function rate(bps) {
  return bps ? `${(bps / MB).toLocaleString(undefined, { maximumFractionDigits: 2 })} MB/s` : 'unlimited';
}

function windowText(w) {
  return `${w.days.join(',')} ${w.start}–${w.end} ${w.paused ? 'paused' : rate(w.limit_bps)}`;
}

function windowLine(w) {
  return `${w.days.join(',')} ${w.start}-${w.end} ${w.paused ? 'paused' : (w.limit_bps || 'off')}`;
}

export function bandwidthPanel(ctx) {
  const isAdmin = ctx.can('admin');
  const canWrite = ctx.can('write');
  const section = h('section', { 'aria-labelledby': 'sec-bandwidth', id: 'bandwidth' });
  const view = h('div', {});
  const forms = h('div', { class: 'two-col' });
  section.append(h('h2', { id: 'sec-bandwidth' }, 'Bandwidth'), view, forms);
  let timer = null;
  let ac = null;
  let last = null;

  function direction(x) {
    return h('td', {}, pill(x.state, STATE_KIND[x.state] || 'muted'), ' ', x.state === 'limited' ? rate(x.limit_bps) : null,
      x.window ? h('div', { class: 'hint' }, `window ${windowText(x.window)}`) : null,
      x.waiting ? h('div', { class: 'hint' }, `${plural(x.waiting, 'chunk')} waiting`) : null);
  }

  function render(data) {
    last = data;
    const rows = data.links.map((l) => h('tr', { dataset: { site: l.peer } },
      h('th', { scope: 'row' }, 'Link to ', l.name || '(no name)', h('div', { class: 'hint mono' }, l.peer),
        h('div', { class: 'hint' }, l.local ? 'local network: exempt' : l.policy.source === 'link' ? 'own limits'
          : l.policy.source === 'default' ? 'network default' : 'no limits')),
      direction(l.send), h('td', { class: 'num' }, rate(l.send.measured_bps)),
      direction(l.receive), h('td', { class: 'num' }, rate(l.receive.measured_bps))));
    const d = data.default;
    const dl = data.downloads;
    replace(view,
      h('p', { class: 'hint' }, `Timetables run in ${data.timezone === 'system' ? 'the server’s time zone' : data.timezone}; it is ${data.local_time} there.`),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {},
        h('caption', { class: 'sr-only' }, 'Replication limits per link'),
        h('thead', {}, h('tr', {}, ['Site', 'Sending: limit now', 'Sending: measured', 'Receiving: limit now', 'Receiving: measured']
          .map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows))) : h('p', { class: 'empty' }, 'Nothing to limit: this site has no links.'),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Network default'), h('dd', {}, `send ${rate(d.send_bps)}, receive ${rate(d.receive_bps)}`,
          d.windows.length ? h('div', { class: 'hint' }, d.windows.map(windowText).join('; ')) : null),
        h('dt', {}, 'Local networks'), h('dd', {}, data.local_networks.exempt ? 'exempt: ' : 'limited: ',
          h('span', { class: 'mono' }, data.local_networks.cidrs.join(', ') || 'none')),
        dl ? [h('dt', {}, 'Mac downloads'), h('dd', {},
          `egress ${rate(dl.egress_bps)}, ${dl.max_concurrent || 'no cap on'} at once, ${dl.per_client || 'no cap'} per client; `
          + `now ${dl.active} (peak ${dl.peak}), ${plural(dl.refused, 'refusal')} with Retry-After, ${rate(dl.measured_bps)}`)] : null,
        h('dt', {}, 'Urgent packages'), h('dd', {}, data.urgent.length
          ? data.urgent.map((u) => h('div', {}, h('strong', {}, u.name), ` marked by ${u.marked_by}`, u.reason ? ` — ${u.reason}` : ''))
          : 'none')));
  }

  function linkForm() {
    const links = [['default', 'Network default (every link without its own)'],
      ...((last && last.links) || []).map((l) => [l.peer, `${l.name || '(no name)'} ${l.peer}`])];
    const link = select(links, 'default');
    const send = h('input', { type: 'text', placeholder: 'e.g. 20MB, off', autocomplete: 'off' });
    const receive = h('input', { type: 'text', placeholder: 'e.g. 20MB, off', autocomplete: 'off' });
    const windows = h('textarea', { rows: 3, spellcheck: 'false', placeholder: 'mon-fri 08:00-18:00 2MB\nsat,sun 00:00-24:00 off' });
    const local = select([['auto', 'by the local networks'], ['yes', 'yes: never limited'], ['no', 'no: always limited']], 'auto');
    const out = h('div', { 'aria-live': 'polite' });
    const fill = () => {
      const l = last && last.links.find((x) => x.peer === link.value);
      const p = link.value === 'default' ? last && last.default : l && l.policy;
      if (!p) return;
      send.value = p.send_bps ? String(p.send_bps) : '';
      receive.value = p.receive_bps ? String(p.receive_bps) : '';
      windows.value = p.windows.map(windowLine).join('\n');
      local.value = p.local || 'auto';
    };
    link.addEventListener('change', fill);
    fill();
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Limit a link'),
      h('p', { class: 'hint' }, 'Bytes per second (20MB = 20 000 000, 2MiB, 500k; empty: unlimited). One window per line: DAYS HH:MM-HH:MM RATE or paused; the first that covers the time replaces the rates. A signed event, in force within a second; running transfers pause and resume from their verified chunks.'),
      field('Link', link).row, field('Send to it', send).row, field('Receive from it', receive).row,
      field('Weekly timetable', windows).row, field('Local', local).row,
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save limits'),
        h('button', { type: 'button', class: 'secondary', on: { click: async () => {
          try {
            render(await api('DELETE', `/api/v1/bandwidth/links/${encodeURIComponent(link.value)}`));
            announce('Limits removed.', 'success');
          } catch (err) { replace(out, messageBox('error', `Could not remove the limits: ${errorText(err)}`)); }
        } } }, 'Remove limits')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        render(await api('PUT', `/api/v1/bandwidth/links/${encodeURIComponent(link.value)}`, {
          send: send.value.trim() || 0, receive: receive.value.trim() || 0, local: local.value,
          windows: windows.value.split('\n').map((s) => s.trim()).filter(Boolean) }));
        replace(out, messageBox('success', 'Saved.'));
      } catch (err) {
        replace(out, messageBox('error', `Not saved: ${errorText(err)}`));
      }
    });
    return form;
  }

  function capsForm() {
    const dl = (last && last.downloads) || {};
    const egress = h('input', { type: 'text', value: dl.egress_bps ? String(dl.egress_bps) : '', placeholder: 'e.g. 500MB; empty: no limit' });
    const most = h('input', { type: 'number', min: '0', value: String(dl.max_concurrent || 0) });
    const perClient = h('input', { type: 'number', min: '0', value: String(dl.per_client || 0) });
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Mac download caps'),
      h('p', { class: 'hint' }, 'Beyond a cap a Mac gets 503 with Retry-After and tries again. 0: no cap.'),
      field('Total egress', egress).row, field('Downloads at once', most).row, field('Per client', perClient).row,
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save caps')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        render(await api('PUT', '/api/v1/bandwidth/downloads', { egress: egress.value.trim() || 0,
          max_concurrent: Number(most.value) || 0, per_client: Number(perClient.value) || 0 }));
        replace(out, messageBox('success', 'Saved.'));
      } catch (err) { replace(out, messageBox('error', `Not saved: ${errorText(err)}`)); }
    });
    return form;
  }

  function urgentForm() {
    const name = h('input', { type: 'text', autocomplete: 'off', placeholder: 'Security-Hotfix.pkg' });
    const reason = h('input', { type: 'text', autocomplete: 'off', placeholder: 'e.g. CVE number' });
    const out = h('div', { 'aria-live': 'polite' });
    const mark = async (urgent) => {
      try {
        render(await api('PUT', `/api/v1/bandwidth/urgent/${encodeURIComponent(name.value.trim())}`, { urgent, reason: reason.value }));
        replace(out, messageBox('success', urgent ? 'Marked urgent: it crosses paused windows and limits on every site.' : 'No longer urgent.'));
      } catch (err) { replace(out, messageBox('error', `Not changed: ${errorText(err)}`)); }
    };
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Urgent package'),
      h('p', { class: 'hint' }, 'A security hotfix need not wait for a window: it is replicated at once. Who marked it is in the event log.'),
      field('Package', name).row, field('Reason', reason).row,
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Mark urgent'),
        h('button', { type: 'button', class: 'secondary', on: { click: () => mark(false) } }, 'Not urgent')), out);
    form.addEventListener('submit', (e) => { e.preventDefault(); mark(true); });
    return form;
  }

  let formsShown = false;
  async function load() {
    if (ac) ac.abort();
    ac = new AbortController();
    clearTimeout(timer);
    try {
      const data = await get('/api/v1/bandwidth', { signal: ac.signal });
      render(data);
      if (!formsShown) {  // once: a refresh must not wipe what the admin is typing
        formsShown = true;
        replace(forms, isAdmin ? linkForm() : null, isAdmin ? capsForm() : null, canWrite ? urgentForm() : null);
      }
    } catch (err) {
      if (ac.signal.aborted) return;
      replace(view, messageBox('error', `Could not read the bandwidth settings: ${errorText(err)}`));
    }
    timer = setTimeout(load, 3000);  // measured rates and windows change without events
  }

  load();
  return { section, stop: () => { clearTimeout(timer); if (ac) ac.abort(); } };
}
