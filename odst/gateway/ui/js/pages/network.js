// Network: this site, its peers with link state and mirror lag, invitations, joining, removal.

import { api, get } from '../api.js';
import { h, append, field, select, replace, messageBox, announce, errorText, fmtDuration, time, copyable,
  secretBox, confirmDialog, debounce, pill, plural, fmtBytes, fmtRate, fmtTime } from '../dom.js';
import { bandwidthPanel } from './bandwidth-panel.js';

const LINK_KIND = { up: 'ok', down: 'bad', unknown: 'muted' };

export function mount(main, ctx) {
  const isAdmin = ctx.can('admin');
  const errors = h('div', {});
  const here = h('section', { 'aria-labelledby': 'sec-here' });
  const integrity = h('section', { 'aria-labelledby': 'sec-integrity' });
  const peersSection = h('section', { 'aria-labelledby': 'sec-peers' });
  const adminSection = isAdmin ? h('section', { 'aria-labelledby': 'sec-link', class: 'two-col' }) : null;
  append(main, h('h1', {}, 'Network'), errors, here, integrity, peersSection, adminSection);
  const bandwidth = bandwidthPanel(ctx);  // limits, windows and measured rates per link (issue 14)
  main.append(bandwidth.section);
  let timer = null;
  let ac = null;

  function renderHere(site, settings) {
    replace(here, h('h2', { id: 'sec-here' }, 'This site'),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Name'), h('dd', {}, site.name || '(no name set)'),
        h('dt', {}, 'Site id'), h('dd', {}, copyable(site.site, 'site id')),
        settings ? [h('dt', {}, 'Public URL'), h('dd', {}, copyable(settings.public_url, 'public URL'))] : null,
        h('dt', {}, 'Public key'), h('dd', {}, copyable(site.public_key, 'public key')),
        h('dt', {}, 'Log'), h('dd', {}, `${plural(site.events, 'event')} (this site’s own: ${site.last_seq}), ${plural(site.packages, 'package')}`),
        h('dt', {}, 'Quarantined'), h('dd', {}, site.quarantined
          ? [pill(`${site.quarantined} messages`, 'bad'), ' ', h('a', { href: '#/events' }, 'see the event log')]
          : pill('none', 'ok'))));
  }

  // Storage integrity: the background scrub and the packages out of service here (GET /api/v1/integrity).
  function renderIntegrity(data) {
    const s = data.scrub || {};
    const every = s.period_s ? `every ${fmtDuration(s.period_s)}` : 'off';
    const pass = s.cursor ? `in progress: ${Math.round(100 * (s.pass_bytes || 0) / Math.max(1, s.pass_total || 1))} %`
      : (s.last_full_pass ? `last full pass ${fmtTime(s.last_full_pass * 1000)}` : 'no full pass yet');
    const rows = data.damaged.map((d) => h('tr', {},
      h('th', { scope: 'row' }, h('a', { href: `#/packages/${encodeURIComponent(d.name)}` }, d.name)),
      h('td', {}, d.found_by || '—'), h('td', {}, time(d.found_at)),
      h('td', {}, d.sources.length ? pill(`repairing from ${d.sources.map((x) => ctx.shortSiteName(x)).join(', ')}`, 'info')
        : pill('no other copy: upload it again', 'bad')),
      h('td', { class: 'hint' }, d.reason)));
    replace(integrity, h('h2', { id: 'sec-integrity' }, 'Storage integrity'),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Scrub'), h('dd', {}, `${every}; ${pass}`),
        h('dt', {}, 'Re-hashed'), h('dd', {}, `${fmtBytes(s.bytes_total || 0)} in all, at ${fmtRate(s.rate)}`),
        h('dt', {}, 'Damage found'), h('dd', {}, s.damaged_total ? pill(plural(s.damaged_total, 'file'), 'bad') : pill('none', 'ok'))),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {}, h('caption', {}, 'Out of service here (downloads answer 503)'),
        h('thead', {}, h('tr', {}, ['Package', 'Found by', 'When', 'Repair', 'Reason'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, rows)))
        : h('p', { class: 'empty' }, 'Every stored package matches its manifest as far as checked.'));
  }

  function renderPeers(data) {
    const rows = data.peers.map((p) => {
      const link = p.link || {};
      const linkWords = link.link === 'up' ? 'up' : link.link === 'down' ? 'down' : 'unknown';
      const remove = isAdmin ? h('button', { type: 'button', class: 'danger small', 'aria-label': `Remove site ${p.name || p.site}` }, 'Remove…') : null;
      if (remove) remove.addEventListener('click', () => removePeer(p, remove));
      return h('tr', { dataset: { site: p.site } },
        h('th', { scope: 'row' }, p.name || '(no name)', h('div', { class: 'hint mono' }, p.site),
          p.http_url ? h('div', { class: 'hint' }, p.http_url) : null),
        h('td', {}, p.registered_here ? 'here' : `via ${p.vouched_by.map((s) => ctx.shortSiteName(s)).join(', ') || '?'}`),
        h('td', {}, pill(linkWords, LINK_KIND[linkWords]), link.error ? h('div', { class: 'hint' }, link.error) : null),
        h('td', { class: 'num' }, link.lag === null || link.lag === undefined || link.last_contact_s === null
          || link.last_contact_s === undefined ? '—' : plural(link.lag, 'event')),
        h('td', {}, link.last_contact_s === null || link.last_contact_s === undefined ? 'never' : `${fmtDuration(link.last_contact_s)} ago`),
        h('td', {}, link.last_event_ts ? time(link.last_event_ts) : '—', link.last_seq ? h('div', { class: 'hint' }, `#${link.last_seq}`) : null),
        h('td', { class: 'num' }, String(p.bad_chunks || 0)),
        isAdmin ? h('td', { class: 'actions' }, remove) : null);
    });
    const cols = ['Site', 'Registered', 'Link', 'Mirror lag', 'Last contact', 'Last event', 'Bad chunks'];
    replace(peersSection, h('h2', { id: 'sec-peers' }, `Other sites (${data.peers.length})`),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'Other sites and their link state'),
        h('thead', {}, h('tr', {}, cols.map((c) => h('th', { scope: 'col' }, c)),
          isAdmin ? h('th', { scope: 'col' }, h('span', { class: 'sr-only' }, 'Actions')) : null)),
        h('tbody', {}, rows)))
        : h('p', { class: 'empty' }, 'No other sites yet.', isAdmin ? ' Invite one below, or join with an invitation from another site.' : ''),
      data.removed && data.removed.length ? h('p', { class: 'hint' }, 'Removed (no longer trusted): ',
        data.removed.map((r) => `${r.site} after its event ${r.upto_seq}`).join('; ')) : null);
  }

  async function removePeer(p, button) {
    const ok = await confirmDialog({ title: 'Remove site?', confirm: 'Remove', danger: true,
      body: h('div', {}, h('p', {}, 'Stop trusting ', h('strong', {}, p.name || p.site), ` (${p.site})?`),
        h('p', { class: 'hint' }, 'Its later events are ignored here and listed in the quarantine as ignored.')) });
    if (!ok) { button.focus(); return; }
    try {
      await api('DELETE', `/api/v1/peers/${encodeURIComponent(p.site)}`);
      announce(`Removed site ${p.name || p.site}.`, 'success');
      load();
    } catch (err) {
      announce(`Could not remove ${p.site}: ${errorText(err)}`, 'error');
    }
  }

  function renderAdmin() {
    if (!adminSection) return;
    const ttl = select([['3600', '1 hour'], ['86400', '1 day'], ['604800', '7 days']], '86400');
    const inviteOut = h('div', { 'aria-live': 'polite' });
    const inviteForm = h('form', { class: 'card' }, h('h3', {}, 'Invite a site'),
      h('p', { class: 'hint' }, 'Creates a one-time invitation token. The other site joins with it.'),
      field('Valid for', ttl).row, h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create invitation')), inviteOut);
    inviteForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        const inv = await api('POST', '/api/v1/peers/invites', { ttl_s: Number(ttl.value) });
        replace(inviteOut, secretBox('Invitation token', inv.token,
          `Valid until ${new Date(inv.expires_ts).toLocaleString()}, once. On the other site: Network → Join, or “odst peer join TOKEN”. It is shown only once.`));
      } catch (err) {
        replace(inviteOut, messageBox('error', `Could not create the invitation: ${errorText(err)}`));
      }
    });
    const token = h('textarea', { rows: 3, spellcheck: 'false', autocomplete: 'off' });
    const joinOut = h('div', { 'aria-live': 'polite' });
    const joinButton = h('button', { type: 'submit' }, 'Join');
    const joinForm = h('form', { class: 'card' }, h('h3', {}, 'Join with an invitation'),
      field('Invitation token', token, 'Paste the token the other site created.').row,
      h('div', { class: 'actions' }, joinButton), joinOut);
    joinForm.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!token.value.trim()) { replace(joinOut, messageBox('error', 'Paste an invitation token first.')); return; }
      joinButton.disabled = true;
      replace(joinOut, messageBox('info', 'Registering with the other site…'));
      try {
        const r = await api('POST', '/api/v1/peers/join', { token: token.value.trim() });
        token.value = '';
        replace(joinOut, messageBox('success', `Registered with ${r.name || r.site} (${r.site}) over ${r.via}.`));
        load();
      } catch (err) {
        replace(joinOut, messageBox('error', `Could not join: ${errorText(err)}`));
      }
      joinButton.disabled = false;
    });
    replace(adminSection, h('h2', { id: 'sec-link', class: 'span' }, 'Link sites'), inviteForm, joinForm,
      ctx.state.settings && ctx.state.settings.jamf_configured ? jamfDpForm() : null);
  }

  // Jamf Pro distribution point records for this site, or every site (POST /api/v1/jamf/distribution-points).
  function jamfDpForm() {
    const all = h('input', { type: 'checkbox', id: 'jamf-all-sites' });
    const out = h('div', { 'aria-live': 'polite' });
    const button = h('button', { type: 'submit' }, 'Register in Jamf Pro');
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Jamf Pro distribution points'),
      h('p', { class: 'hint' }, 'Creates or updates a distribution point record with this site’s public URL (HTTPS through the Jamf Pro API, HTTP through the Classic API).'),
      h('div', { class: 'check' }, all, h('label', { for: all.id }, 'every site of the network')),
      h('div', { class: 'actions' }, button), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      button.disabled = true;
      try {
        const r = await api('POST', '/api/v1/jamf/distribution-points', { all_sites: all.checked });
        replace(out, messageBox('success', r.distribution_points.map((d) => `${d.name}: ${d.action} (${d.api} API)`).join('; ')));
      } catch (err) {
        replace(out, messageBox('error', `Could not register: ${errorText(err)}`));
      }
      button.disabled = false;
    });
    return form;
  }

  async function load() {
    if (ac) ac.abort();
    ac = new AbortController();
    clearTimeout(timer);
    const [site, peers, health] = await Promise.allSettled([get('/api/v1/site', { signal: ac.signal }),
      get('/api/v1/peers', { signal: ac.signal }), get('/api/v1/integrity', { signal: ac.signal })]);
    if (ac.signal.aborted) return;
    const problems = [];
    if (site.status === 'fulfilled') renderHere(site.value, ctx.state.settings);
    else problems.push(messageBox('error', `Could not read this site: ${errorText(site.reason)}`));
    if (peers.status === 'fulfilled') {
      ctx.state.peers = peers.value.peers;
      renderPeers(peers.value);
    } else problems.push(messageBox('error', `Could not list the sites: ${errorText(peers.reason)}`));
    if (health.status === 'fulfilled') renderIntegrity(health.value);
    replace(errors, problems);
    // Link state and lag change without events: refresh them every few seconds while this page is open.
    timer = setTimeout(load, 5000);
  }

  const reload = debounce(load, 200);
  const unsubscribe = ctx.feed.subscribe((e) => { if (e.type.startsWith('Peer') || e.type === 'SiteFounded') reload(); });
  renderAdmin();
  here.append(h('p', { class: 'loading' }, 'Loading…'));
  load();
  return () => {
    bandwidth.stop();
    unsubscribe();
    reload.cancel();
    clearTimeout(timer);
    if (ac) ac.abort();
  };
}
