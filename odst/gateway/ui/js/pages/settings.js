// Settings: the site's (read-only) configuration, my password, and for admins users, API tokens,
// event subscribers (NATS credentials), webhooks and email subscriptions.

import { api, get, setCsrfToken } from '../api.js';
import { h, append, field, select, replace, messageBox, announce, errorText, fmtBytes, fmtBinaryBytes, fmtDuration, time, secretBox,
  confirmDialog, formDialog, debounce, pill, uid } from '../dom.js';

const ROLES = ['admin', 'operator', 'auditor'];
const ROLE_WORDS = { admin: 'admin: everything', operator: 'operator: upload, stage, delete', auditor: 'auditor: read only' };
const MIN_PASSWORD = 10; // the server's default (odst/accounts/passwords.py); it checks and says so

function sectionHead(id, title, intro) {
  return [h('h2', { id }, title), intro ? h('p', { class: 'hint' }, intro) : null];
}

function eventTypeBoxes(types, legend) {
  const boxes = types.map((t) => {
    const input = h('input', { type: 'checkbox', value: t, id: uid('cb') });
    return { input, row: h('div', { class: 'check' }, input, h('label', { for: input.id }, t)) };
  });
  const fieldset = h('fieldset', { class: 'checks' }, h('legend', {}, legend), boxes.map((b) => b.row));
  return { fieldset, checked: () => boxes.filter((b) => b.input.checked).map((b) => b.input.value),
    clear: () => boxes.forEach((b) => { b.input.checked = false; }) };
}

function passwordProblem(values) {
  if (!values.new) return 'Enter the new password.';
  if ('confirm' in values && values.new !== values.confirm) return 'The two new passwords differ.';
  return null;
}

export function mount(main, ctx) {
  const isAdmin = ctx.can('admin');
  const session = ctx.state.session;
  const sections = {
    site: h('section', { 'aria-labelledby': 'sec-site' }),
    account: h('section', { 'aria-labelledby': 'sec-account' }),
    users: isAdmin ? h('section', { 'aria-labelledby': 'sec-users' }) : null,
    tokens: isAdmin ? h('section', { 'aria-labelledby': 'sec-tokens' }) : null,
    subscribers: isAdmin ? h('section', { 'aria-labelledby': 'sec-subscribers' }) : null,
    webhooks: isAdmin ? h('section', { 'aria-labelledby': 'sec-webhooks' }) : null,
    email: isAdmin ? h('section', { 'aria-labelledby': 'sec-email' }) : null,
  };
  const titles = { site: 'Site settings', account: 'My account', users: 'Users', tokens: 'API tokens',
    subscribers: 'Event subscribers', webhooks: 'Webhooks', email: 'Email digests' };
  // One section at a time, chosen with tabs (arrow keys move between them); the tab is in the
  // address (#/settings?tab=users) so a reload or a link opens it again.
  const keys = Object.entries(sections).filter(([, el]) => el).map(([key]) => key);
  const asked = new URLSearchParams(location.hash.split('?')[1] || '').get('tab');
  let current = keys.includes(asked) ? asked : 'site';
  const tabs = {};
  const tablist = h('div', { role: 'tablist', 'aria-label': 'Settings sections', class: 'tabs' });
  for (const key of keys) {
    const tab = h('button', { type: 'button', role: 'tab', id: `tab-${key}`, 'aria-controls': `panel-${key}` }, titles[key]);
    tab.addEventListener('click', () => showTab(key, true));
    tab.addEventListener('keydown', (e) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
      const jump = { Home: 0, End: keys.length - 1 }[e.key];
      if (step === undefined && jump === undefined) return;
      e.preventDefault();
      const next = keys[jump !== undefined ? jump : (keys.indexOf(key) + step + keys.length) % keys.length];
      showTab(next, true);
      tabs[next].focus();
    });
    tabs[key] = tab;
    tablist.append(tab);
    Object.assign(sections[key], { id: `panel-${key}` });
    sections[key].setAttribute('role', 'tabpanel');
  }
  function showTab(key, remember) {
    current = key;
    for (const k of keys) {
      const on = k === key;
      tabs[k].setAttribute('aria-selected', String(on));
      tabs[k].tabIndex = on ? 0 : -1;
      sections[k].hidden = !on;
    }
    if (remember) history.replaceState(null, '', `#/settings?tab=${key}`);
  }
  showTab(current, false);
  append(main, h('h1', {}, 'Settings'), tablist, ...Object.values(sections).filter(Boolean));

  // ---- site settings (read-only)
  async function loadSite() {
    let s;
    try {
      s = await get('/api/v1/settings');
      ctx.state.settings = s;
    } catch (err) {
      replace(sections.site, sectionHead('sec-site', titles.site), messageBox('error', `Could not read the settings: ${errorText(err)}`));
      return;
    }
    const smtp = s.smtp || {};
    const ldap = s.ldap || {};
    const facts = [
      ['Site name', s.site_name || '(none)'], ['Site id', s.site_id], ['Public URL', s.public_url],
      ['Distribution point', `/${s.context}/Packages/<name>`],
      ['Download authentication', s.download_auth === 'basic' ? 'user name and password (basic)' : 'none'],
      ['Stages', (s.stages || []).join(', ')], ['Stages replicated here', (s.accepted_stages || []).join(', ') || 'all'],
      ['Default stage', s.default_stage], ['Allowed extensions', (s.allowed_extensions || []).join(', ')],
      ['Largest upload', `${fmtBinaryBytes(s.max_upload_bytes)}`],
      ['Mail (SMTP)', smtp.configured ? `${smtp.host}:${smtp.port}${smtp.starttls ? ' with STARTTLS' : ''}, from ${smtp.from}` : 'not configured'],
      ['Directory (LDAP)', ldap.configured ? `${ldap.url}, users under ${ldap.user_base}` : 'not configured (local users only)'],
      ['Directory groups → roles', ldap.configured && ldap.role_map && ldap.role_map.length ? ldap.role_map.join('; ') : '—'],
      ['Session', `ends after ${fmtDuration(s.session_idle_s)} unused, or ${fmtDuration(s.session_max_s)} after sign-in`],
    ];
    const choosable = isAdmin && 'accepted_stages_source' in s;
    replace(sections.site, sectionHead('sec-site', titles.site,
      'Read-only here: these come from the server’s odst.toml and ODST_* environment variables. Change them there and restart the site.'
      + (isAdmin ? ' The site’s name and the stages it replicates are the exceptions: an admin chooses them below.' : '')),
    h('dl', { class: 'facts' }, facts.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
    isAdmin ? siteNameForm(s) : null,
    choosable ? stagesForm(s) : null,
    isAdmin && ldap.configured ? ldapCheck() : null,
    s.jamf_configured ? jamfCard(isAdmin) : null);
  }

  // Jamf Pro: the connection and what ODST keeps there (GET /api/v1/jamf); admins may test it.
  function jamfCard(canCheck) {
    const out = h('div', { 'aria-live': 'polite' });
    const facts = h('dl', { class: 'facts' });
    const card = h('div', { class: 'card', id: 'jamf-card' }, h('h3', {}, 'Jamf Pro'), facts, out);
    function show(j) {
      const c = j.connection || {};
      replace(facts, [
        ['Server', `${j.url} (${j.auth === 'oauth' ? 'API client' : 'account'})`],
        ['Connection', !c.checked ? 'not checked since the site started' : c.ok
          ? pill(`connected, Jamf Pro ${c.version || ''}`, 'ok') : pill(`failed: ${c.error}`, 'bad')],
        ['Package records', `for stage ${j.stage}, hash ${j.hash_type}, ${j.quorum ? `once ${j.quorum} sites serve them` : 'once every site replicating it serves them'}`
          + (j.dry_run ? ' — dry run: nothing is changed in Jamf Pro' : '') + (j.allow_deletes ? '; deletes allowed (records ODST created)' : '; never deleted')],
        ['Records', Object.entries(j.records || {}).map(([k, n]) => `${n} ${k.replace('_', ' ')}`).join(', ') || 'none yet'],
        ['Distribution points', (j.distribution_points || []).map((d) => `${d.dp_name} (${d.api})`).join(', ') || 'none registered'],
      ].map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
    }
    get('/api/v1/jamf').then(show).catch((err) => replace(out, messageBox('error', `Could not read the Jamf Pro state: ${errorText(err)}`)));
    if (canCheck) {
      const button = h('button', { type: 'button', class: 'secondary' }, 'Check the Jamf Pro connection');
      button.addEventListener('click', async () => {
        button.disabled = true;
        replace(out, messageBox('info', 'Asking Jamf Pro for a token…'));
        try {
          const r = await api('POST', '/api/v1/jamf/check-connection');
          replace(out, messageBox('success', `Connected to Jamf Pro ${r.version} at ${r.url}.`));
        } catch (err) {
          replace(out, messageBox('error', `The Jamf Pro connection failed: ${errorText(err)}`));
        }
        get('/api/v1/jamf').then(show).catch(() => {});
        button.disabled = false;
      });
      card.insertBefore(h('div', { class: 'actions' }, button), out);
    }
    return card;
  }

  // The site's name is chosen here (a signed event, SiteRenamed); peers show it too.
  function siteNameForm(s) {
    const input = h('input', { type: 'text', value: s.site_name || '', maxlength: 100, autocomplete: 'off', required: true });
    const source = s.site_name_source || {};
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Site name'),
      h('p', { class: 'hint' }, source.from === 'event'
        ? ['Chosen here ', time(source.updated_at), source.updated_by ? ` by ${source.updated_by}` : '', '. Every page and every peer shows it.']
        : source.from === 'setting' ? 'From the site_name setting until chosen here. Every page and every peer shows it.'
          : 'This site has no name yet. Name it: every page and every peer shows the name.'),
      field('Name of this site', input).row,
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save name')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!input.value.trim()) { replace(out, messageBox('error', 'Enter a name.')); input.focus(); return; }
      try {
        const updated = await api('PUT', '/api/v1/settings/site-name', { name: input.value });
        ctx.state.settings = updated;
        if (ctx.state.site) ctx.state.site.name = updated.site_name;
        if (ctx.renderHeader) ctx.renderHeader();
        announce(`This site is now called ${updated.site_name}.`, 'success');
        loadSite();
      } catch (err) {
        replace(out, messageBox('error', `Could not rename the site: ${errorText(err)}`));
      }
    });
    return form;
  }

  // The stages this site replicates are the one setting chosen here (a signed event), not in odst.toml.
  function stagesForm(s) {
    const boxes = s.stages.map((stage) => {
      const input = h('input', { type: 'checkbox', value: stage, id: uid('cb'), checked: s.accepted_stages.includes(stage) });
      return { input, row: h('div', { class: 'check' }, input, h('label', { for: input.id }, stage)) };
    });
    const source = s.accepted_stages_source || {};
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Stages this site replicates'),
      h('p', { class: 'hint' }, source.from === 'event'
        ? ['Chosen here ', time(source.updated_at), source.updated_by ? ` by ${source.updated_by}` : '', '.']
        : `From the ${source.from === 'setting' ? 'accept_stages setting' : 'default (all stages)'} until chosen here.`),
      h('fieldset', { class: 'checks' }, h('legend', {}, 'Replicate packages in'), boxes.map((b) => b.row)),
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save stages')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const stages = boxes.filter((b) => b.input.checked).map((b) => b.input.value);
      try {
        const updated = await api('PUT', '/api/v1/settings/accepted-stages', { stages });
        ctx.state.settings = updated;
        announce(`This site now replicates ${updated.accepted_stages.join(', ')}.`, 'success');
        loadSite();
      } catch (err) {
        replace(out, messageBox('error', `Could not save the stages: ${errorText(err)}`));
      }
    });
    return form;
  }

  function ldapCheck() {
    const out = h('div', { 'aria-live': 'polite' });
    const button = h('button', { type: 'button', class: 'secondary' }, 'Check the directory settings');
    button.addEventListener('click', async () => {
      button.disabled = true;
      replace(out, messageBox('info', 'Connecting to the directory…'));
      try {
        const r = await api('POST', '/api/v1/settings/ldap-check');
        replace(out, messageBox('success', `The directory answered: ${r.detail}`));
      } catch (err) {
        replace(out, messageBox('error', `The directory check failed: ${errorText(err)}`));
      }
      button.disabled = false;
    });
    return h('div', { class: 'card' }, h('h3', {}, 'Directory (LDAP)'),
      h('p', { class: 'hint' }, 'Binds with the service account and searches the user base, without a user signing in.'),
      h('div', { class: 'actions' }, button), out);
  }

  // ---- my account
  function renderAccount() {
    const local = session.source !== 'ldap';
    const parts = [...sectionHead('sec-account', titles.account),
      h('dl', { class: 'facts' },
        h('dt', {}, 'User name'), h('dd', {}, session.username),
        h('dt', {}, 'Name'), h('dd', {}, session.display_name || '—'),
        h('dt', {}, 'Role'), h('dd', {}, ROLE_WORDS[session.role] || session.role),
        h('dt', {}, 'Account'), h('dd', {}, local ? 'local to this site' : 'from the directory (LDAP)'),
        h('dt', {}, 'Session ends'), h('dd', {}, session.expires_at ? time(session.expires_at) : '—'))];
    if (!local) {
      parts.push(h('p', { class: 'hint' }, 'Your password is managed by the directory, not by ODST.'));
      replace(sections.account, parts);
      return;
    }
    const current = h('input', { type: 'password', autocomplete: 'current-password' });
    const next = h('input', { type: 'password', autocomplete: 'new-password', minlength: MIN_PASSWORD });
    const again = h('input', { type: 'password', autocomplete: 'new-password' });
    const out = h('div', {});
    const account = h('input', { type: 'text', autocomplete: 'username', value: session.username, hidden: true, tabindex: '-1' });
    const form = h('form', { class: 'card narrow', novalidate: true }, h('h3', {}, 'Change my password'), account,
      field('Current password', current).row, field('New password', next, `At least ${MIN_PASSWORD} characters.`).row,
      field('New password again', again).row, h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Change password')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const problem = !current.value ? 'Enter your current password.' : passwordProblem({ new: next.value, confirm: again.value });
      if (problem) { replace(out, messageBox('error', problem)); return; }
      ctx.state.changingPassword = true;
      try {
        // The server ends every other session and starts this one afresh, with a new CSRF token.
        const fresh = await api('POST', '/api/v1/session/password', { current: current.value, new: next.value });
        Object.assign(ctx.state.session || session, fresh);
        setCsrfToken(fresh.csrf_token);
        form.reset();
        replace(out, messageBox('success', 'Your password was changed. Your other sessions were signed out.'));
      } catch (err) {
        replace(out, messageBox('error', `Could not change the password: ${errorText(err)}`));
      } finally {
        ctx.state.changingPassword = false; // an event after this point finds the new session valid
      }
    });
    parts.push(form);
    replace(sections.account, parts);
  }

  // ---- users (admin); each form is built once so a live refresh of its list keeps what is typed
  let addUser = null;
  async function loadUsers() {
    let data;
    addUser ||= userForm();
    try { data = await get('/api/v1/users'); } catch (err) {
      replace(sections.users, sectionHead('sec-users', titles.users), messageBox('error', `Could not list the users: ${errorText(err)}`), addUser);
      return;
    }
    const rows = data.users.map((u) => {
      const self = u.username === session.username;
      const role = select(ROLES, u.role, { 'aria-label': `Role of ${u.username}`, class: 'compact' });
      role.addEventListener('change', async () => {
        try {
          await api('PATCH', `/api/v1/users/${encodeURIComponent(u.username)}`, { role: role.value });
          announce(`${u.username} is now ${role.value}.`, 'success');
        } catch (err) {
          role.value = u.role;
          announce(`Could not change the role of ${u.username}: ${errorText(err)}`, 'error');
        }
      });
      const reset = h('button', { type: 'button', class: 'secondary small', 'aria-label': `Reset the password of ${u.username}` }, 'Reset password…');
      reset.addEventListener('click', async () => {
        const v = await formDialog({ title: `New password for ${u.username}`, confirm: 'Set password', validate: passwordProblem, username: u.username,
          fields: [{ name: 'new', label: 'New password', type: 'password', autocomplete: 'new-password', hint: `At least ${MIN_PASSWORD} characters. Tell the user over a safe channel.` },
            { name: 'confirm', label: 'New password again', type: 'password', autocomplete: 'new-password' }] });
        reset.focus();
        if (!v) return;
        try {
          await api('PATCH', `/api/v1/users/${encodeURIComponent(u.username)}`, { password: v.new });
          announce(`The password of ${u.username} was reset.`, 'success');
        } catch (err) {
          announce(`Could not reset the password of ${u.username}: ${errorText(err)}`, 'error');
        }
      });
      const del = h('button', { type: 'button', class: 'danger small', 'aria-label': `Delete user ${u.username}` }, 'Delete…');
      del.addEventListener('click', async () => {
        const ok = await confirmDialog({ title: 'Delete user?', confirm: 'Delete', danger: true,
          body: h('p', {}, 'Delete the user ', h('strong', {}, u.username), '? Their sessions end at once.') });
        if (!ok) { del.focus(); return; }
        try {
          await api('DELETE', `/api/v1/users/${encodeURIComponent(u.username)}`);
          announce(`Deleted user ${u.username}.`, 'success');
          loadUsers();
        } catch (err) {
          announce(`Could not delete ${u.username}: ${errorText(err)}`, 'error');
        }
      });
      return h('tr', { dataset: { user: u.username } },
        h('th', { scope: 'row' }, u.username, self ? h('span', { class: 'hint' }, ' (you)') : null),
        h('td', {}, u.display_name || '—'), h('td', {}, role),
        h('td', {}, time(u.created_at), u.created_by ? h('div', { class: 'hint' }, `by ${u.created_by}`) : null),
        h('td', { class: 'actions' }, reset, ' ', del));
    });
    replace(sections.users, sectionHead('sec-users', titles.users, 'Local accounts for the web interface. Directory (LDAP) users sign in with their own password and need no account here.'),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'Users'),
        h('thead', {}, h('tr', {}, ['User name', 'Name', 'Role', 'Created', ''].map((c) => h('th', { scope: 'col' }, c || h('span', { class: 'sr-only' }, 'Actions'))))),
        h('tbody', {}, rows))) : h('p', { class: 'empty' }, 'No local users.'),
      addUser);
  }

  function userForm() {
    const username = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', autocapitalize: 'none' });
    const displayName = h('input', { type: 'text', autocomplete: 'off' });
    const role = select(ROLES.map((r) => [r, ROLE_WORDS[r]]), 'operator');
    const password = h('input', { type: 'password', autocomplete: 'new-password' });
    const out = h('div', {});
    username.setAttribute('autocomplete', 'username');
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Add a user'),
      h('div', { class: 'grid' }, field('User name', username).row, field('Name', displayName, 'Optional, shown in the header.').row,
        field('Role', role).row, field('Password', password, `At least ${MIN_PASSWORD} characters.`).row),
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Add user')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!username.value.trim()) { replace(out, messageBox('error', 'Enter a user name.')); username.focus(); return; }
      const problem = passwordProblem({ new: password.value });
      if (problem) { replace(out, messageBox('error', problem)); password.focus(); return; }
      try {
        await api('POST', '/api/v1/users', { username: username.value.trim(), password: password.value, role: role.value, display_name: displayName.value.trim() });
        announce(`Added user ${username.value.trim()}.`, 'success');
        form.reset();
        replace(out);
        loadUsers();
      } catch (err) {
        replace(out, messageBox('error', `Could not add the user: ${errorText(err)}`));
      }
    });
    return form;
  }

  // ---- API tokens (admin)
  let tokenForm = null;
  function makeTokenForm() {
    const name = h('input', { type: 'text', autocomplete: 'off' });
    const role = select(ROLES.map((r) => [r, ROLE_WORDS[r]]), 'operator');
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Create an API token'),
      h('div', { class: 'grid' }, field('Name', name, 'What uses it, e.g. “Jamf Pro sync”.').row, field('Role', role).row),
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create token')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!name.value.trim()) { replace(out, messageBox('error', 'Enter a name for the token.')); name.focus(); return; }
      try {
        const t = await api('POST', '/api/v1/tokens', { name: name.value.trim(), role: role.value });
        form.reset();
        replace(out, secretBox(`API token “${t.name}”`, t.token, 'Copy it now: it is shown only once. Use it as “Authorization: Bearer <token>”.'));
        loadTokens();
      } catch (err) {
        replace(out, messageBox('error', `Could not create the token: ${errorText(err)}`));
      }
    });
    return form;
  }

  async function loadTokens() {
    let data;
    tokenForm ||= makeTokenForm();
    try { data = await get('/api/v1/tokens'); } catch (err) {
      replace(sections.tokens, sectionHead('sec-tokens', titles.tokens), messageBox('error', `Could not list the tokens: ${errorText(err)}`), tokenForm);
      return;
    }
    const rows = data.tokens.slice().reverse().map((t) => {
      const revoke = t.revoked_at ? null : h('button', { type: 'button', class: 'danger small', 'aria-label': `Revoke token ${t.name}` }, 'Revoke…');
      if (revoke) {
        revoke.addEventListener('click', async () => {
          const ok = await confirmDialog({ title: 'Revoke API token?', confirm: 'Revoke', danger: true,
            body: h('p', {}, 'Revoke ', h('strong', {}, t.name), ` (${t.role})? Anything using it stops working at once.`) });
          if (!ok) { revoke.focus(); return; }
          try {
            await api('DELETE', `/api/v1/tokens/${encodeURIComponent(t.token_id)}`);
            announce(`Revoked token ${t.name}.`, 'success');
            loadTokens();
          } catch (err) {
            announce(`Could not revoke ${t.name}: ${errorText(err)}`, 'error');
          }
        });
      }
      return h('tr', {}, h('th', { scope: 'row' }, t.name, h('div', { class: 'hint mono' }, t.token_id)),
        h('td', {}, t.role), h('td', {}, time(t.created_at), t.created_by ? h('div', { class: 'hint' }, `by ${t.created_by}`) : null),
        h('td', {}, t.revoked_at ? [pill('revoked', 'muted'), ' ', time(t.revoked_at)] : pill('active', 'ok')),
        h('td', { class: 'actions' }, revoke));
    });
    replace(sections.tokens, sectionHead('sec-tokens', titles.tokens, 'For scripts and other services (Authorization: Bearer). Stored only as a SHA-256 hash.'),
      h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'API tokens'),
        h('thead', {}, h('tr', {}, ['Name', 'Role', 'Created', 'Status', ''].map((c) => h('th', { scope: 'col' }, c || h('span', { class: 'sr-only' }, 'Actions'))))),
        h('tbody', {}, rows))), tokenForm);
  }

  // ---- event subscribers: NATS credentials of downstream services (admin)
  let credentialForm = null;
  function makeCredentialForm() {
    const name = h('input', { type: 'text', autocomplete: 'off', maxlength: 64, pattern: '[A-Za-z0-9_-]+' });
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Add an event subscriber'),
      h('div', { class: 'grid' }, field('Name', name, 'Letters, digits, “_” and “-”, e.g. “jamf-sync”. Its consumers must have this name.').row),
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create credential')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const value = name.value.trim();
      if (!/^[A-Za-z0-9_-]{1,64}$/.test(value)) {
        replace(out, messageBox('error', 'Enter a name of 1 to 64 letters, digits, “_” or “-”.')); name.focus(); return;
      }
      try {
        const c = await api('POST', '/api/v1/credentials', { name: value, role: 'subscriber' });
        form.reset();
        const file = URL.createObjectURL(new Blob([`${c.seed}\n`], { type: 'text/plain' }));
        replace(out, secretBox(`NATS seed of “${c.name}”`, c.seed,
          `Copy it now or save it as a file: it is shown only once. Broker: ${c.servers.join(', ')}. ` +
          `nats-py: nats.connect(url, nkeys_seed_str=seed, inbox_prefix="${c.inbox_prefix}"); NATS CLI: nats --nkey ${c.name}.nk --inbox-prefix ${c.inbox_prefix}. ` +
          `It may subscribe to odst.*.ev.> and ${c.inbox_prefix}.> (its replies) and read EVENTS and PEER_<site> through one consumer per stream named “${c.name}” (pull, or push to ${c.inbox_prefix}.…); nothing else.`),
          h('p', {}, h('a', { href: file, download: `${c.name}.nk` }, `Save ${c.name}.nk`)));
        loadCredentials();
      } catch (err) {
        replace(out, messageBox('error', `Could not create the credential: ${errorText(err)}`));
      }
    });
    return form;
  }

  async function loadCredentials() {
    let data;
    credentialForm ||= makeCredentialForm();
    try { data = await get('/api/v1/credentials'); } catch (err) {
      replace(sections.subscribers, sectionHead('sec-subscribers', titles.subscribers), messageBox('error', `Could not list the credentials: ${errorText(err)}`), credentialForm);
      return;
    }
    const rows = data.credentials.slice().reverse().map((c) => {
      const revoke = c.revoked_at ? null : h('button', { type: 'button', class: 'danger small', 'aria-label': `Revoke subscriber ${c.name}` }, 'Revoke…');
      if (revoke) {
        revoke.addEventListener('click', async () => {
          const ok = await confirmDialog({ title: 'Revoke event subscriber?', confirm: 'Revoke', danger: true,
            body: h('p', {}, 'Revoke ', h('strong', {}, c.name), '? The broker disconnects it and refuses its seed from then on.') });
          if (!ok) { revoke.focus(); return; }
          try {
            await api('DELETE', `/api/v1/credentials/${encodeURIComponent(c.credential_id)}`);
            announce(`Revoked subscriber ${c.name}.`, 'success');
            loadCredentials();
          } catch (err) {
            announce(`Could not revoke ${c.name}: ${errorText(err)}`, 'error');
          }
        });
      }
      return h('tr', {}, h('th', { scope: 'row' }, c.name, h('div', { class: 'hint mono' }, c.credential_id)),
        h('td', {}, c.role), h('td', {}, time(c.created_at), c.created_by ? h('div', { class: 'hint' }, `by ${c.created_by}`) : null),
        h('td', {}, c.revoked_at ? [pill('revoked', 'muted'), ' ', time(c.revoked_at)] : pill('active', 'ok')),
        h('td', { class: 'actions' }, revoke));
    });
    replace(sections.subscribers, sectionHead('sec-subscribers', titles.subscribers, 'Services that read this site’s events straight from its NATS broker, read-only. Only the public key is kept.'),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'Event subscribers'),
        h('thead', {}, h('tr', {}, ['Name', 'Role', 'Created', 'Status', ''].map((c) => h('th', { scope: 'col' }, c || h('span', { class: 'sr-only' }, 'Actions'))))),
        h('tbody', {}, rows))) : h('p', { class: 'empty' }, 'No event subscribers.'), credentialForm);
  }

  // ---- webhooks (admin)
  let webhookForm = null;
  function makeWebhookForm(eventTypes) {
    const url = h('input', { type: 'url', autocomplete: 'off', placeholder: 'https://hooks.example.com/odst' });
    const description = h('input', { type: 'text', autocomplete: 'off' });
    const types = eventTypeBoxes(eventTypes, 'Send these events');
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Add a webhook'),
      h('div', { class: 'grid' }, field('URL', url).row, field('Description', description, 'Optional.').row),
      types.fieldset, h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Add webhook')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        const w = await api('POST', '/api/v1/webhooks', { url: url.value.trim(), event_types: types.checked(), description: description.value.trim() });
        form.reset();
        replace(out, secretBox(`Signing secret for ${w.url}`, w.secret,
          `Verify the ${w.signature_header} header of each delivery with it (see the README). It is shown only once.`));
        loadWebhooks();
      } catch (err) {
        replace(out, messageBox('error', `Could not add the webhook: ${errorText(err)}`));
      }
    });
    return form;
  }

  function deliveriesTable(w, d) {
    if (!d.deliveries.length) return h('p', { class: 'empty' }, 'No deliveries yet.');
    const kind = (status) => (status === 'delivered' ? 'ok' : status === 'failed' ? 'bad' : status === 'cancelled' ? 'muted' : 'info');
    return h('table', { class: 'inner' }, h('caption', {}, `Latest deliveries to ${w.url}`),
      h('thead', {}, h('tr', {}, ['Event', 'Status', 'Attempts', 'Last answer', 'Last attempt', 'Last error'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, d.deliveries.map((x) => h('tr', {}, h('td', {}, x.type), h('td', {}, pill(x.status, kind(x.status))),
        h('td', { class: 'num' }, String(x.attempts)), h('td', {}, x.last_status ? `HTTP ${x.last_status}` : '—'),
        h('td', {}, x.last_attempt_at ? time(x.last_attempt_at) : '—'), h('td', { class: 'break' }, x.last_error || '—')))));
  }

  const openDeliveries = new Set(); // webhook ids whose delivery log is open: a live refresh keeps it open
  async function loadWebhooks() {
    let data;
    try { data = await get('/api/v1/webhooks'); } catch (err) {
      replace(sections.webhooks, sectionHead('sec-webhooks', titles.webhooks), messageBox('error', `Could not list the webhooks: ${errorText(err)}`));
      return;
    }
    webhookForm ||= makeWebhookForm(data.event_types);
    const rows = [];
    const reopen = [];
    for (const w of data.webhooks) {
      const toggle = h('button', { type: 'button', class: 'secondary small', 'aria-expanded': 'false', 'aria-label': `Deliveries to ${w.url}` }, 'Deliveries');
      const del = h('button', { type: 'button', class: 'danger small', 'aria-label': `Delete webhook to ${w.url}` }, 'Delete…');
      const tr = h('tr', {}, h('th', { scope: 'row', class: 'break' }, w.url, h('div', { class: 'hint mono' }, w.webhook_id)),
        h('td', {}, w.description || '—'), h('td', { class: 'types' }, w.event_types.join(', ')),
        h('td', {}, time(w.created_at)), h('td', { class: 'actions' }, toggle, ' ', del));
      const showDeliveries = async () => {
        const open = toggle.getAttribute('aria-expanded') === 'true';
        toggle.setAttribute('aria-expanded', String(!open));
        if (open) { openDeliveries.delete(w.webhook_id); tr.nextSibling.remove(); return; }
        openDeliveries.add(w.webhook_id);
        const cell = h('td', { colspan: 5 }, h('p', { class: 'loading' }, 'Loading deliveries…'));
        tr.after(h('tr', { class: 'detail' }, cell));
        try {
          replace(cell, deliveriesTable(w, await get(`/api/v1/webhooks/${encodeURIComponent(w.webhook_id)}/deliveries?limit=50`)));
        } catch (err) {
          replace(cell, messageBox('error', `Could not read the deliveries: ${errorText(err)}`));
        }
      };
      toggle.addEventListener('click', showDeliveries);
      del.addEventListener('click', async () => {
        const ok = await confirmDialog({ title: 'Delete webhook?', confirm: 'Delete', danger: true,
          body: h('p', {}, 'Stop sending events to ', h('strong', { class: 'break' }, w.url), '? Pending deliveries are cancelled.') });
        if (!ok) { del.focus(); return; }
        try {
          await api('DELETE', `/api/v1/webhooks/${encodeURIComponent(w.webhook_id)}`);
          announce('Webhook deleted.', 'success');
          loadWebhooks();
        } catch (err) {
          announce(`Could not delete the webhook: ${errorText(err)}`, 'error');
        }
      });
      rows.push(tr);
      if (openDeliveries.has(w.webhook_id)) {
        openDeliveries.delete(w.webhook_id);
        reopen.push(showDeliveries);
      }
    }
    replace(sections.webhooks, sectionHead('sec-webhooks', titles.webhooks, 'Each delivery is a signed POST (X-ODST-Signature), retried with backoff until the receiver answers 2xx.'),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'Webhooks'),
        h('thead', {}, h('tr', {}, ['URL', 'Description', 'Events', 'Created', ''].map((c) => h('th', { scope: 'col' }, c || h('span', { class: 'sr-only' }, 'Actions'))))),
        h('tbody', {}, rows))) : h('p', { class: 'empty' }, 'No webhooks.'), webhookForm);
    reopen.forEach((fn) => fn());
  }

  // ---- email subscriptions (admin)
  let emailForm = null;
  function makeEmailForm(eventTypes) {
    const recipient = h('input', { type: 'email', autocomplete: 'off', placeholder: 'macadmins@example.com' });
    const types = eventTypeBoxes(eventTypes, 'Mail these events');
    const out = h('div', { 'aria-live': 'polite' });
    const form = h('form', { class: 'card', novalidate: true }, h('h3', {}, 'Add a recipient'),
      field('Email address', recipient).row, types.fieldset,
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Add recipient')), out);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        await api('POST', '/api/v1/email-subscriptions', { recipient: recipient.value.trim(), event_types: types.checked() });
        announce(`Added ${recipient.value.trim()}.`, 'success');
        form.reset();
        replace(out);
        loadEmail();
      } catch (err) {
        replace(out, messageBox('error', `Could not add the recipient: ${errorText(err)}`));
      }
    });
    return form;
  }

  async function loadEmail() {
    let data;
    try { data = await get('/api/v1/email-subscriptions'); } catch (err) {
      replace(sections.email, sectionHead('sec-email', titles.email), messageBox('error', `Could not list the email subscriptions: ${errorText(err)}`));
      return;
    }
    emailForm ||= makeEmailForm(data.event_types);
    const rows = data.subscriptions.map((s) => {
      const del = h('button', { type: 'button', class: 'danger small', 'aria-label': `Remove the subscription of ${s.recipient}` }, 'Remove…');
      del.addEventListener('click', async () => {
        const ok = await confirmDialog({ title: 'Remove email subscription?', confirm: 'Remove', danger: true,
          body: h('p', {}, 'Stop mailing ', h('strong', {}, s.recipient), '?') });
        if (!ok) { del.focus(); return; }
        try {
          await api('DELETE', `/api/v1/email-subscriptions/${encodeURIComponent(s.subscription_id)}`);
          announce(`Removed ${s.recipient}.`, 'success');
          loadEmail();
        } catch (err) {
          announce(`Could not remove ${s.recipient}: ${errorText(err)}`, 'error');
        }
      });
      return h('tr', {}, h('th', { scope: 'row' }, s.recipient), h('td', { class: 'types' }, (s.event_types || []).join(', ')),
        h('td', {}, time(s.created_at)), h('td', { class: 'actions' }, del));
    });
    replace(sections.email, sectionHead('sec-email', titles.email, `Events within ${fmtDuration(data.digest_s)} go out as one mail per recipient.`),
      data.smtp_configured ? null : messageBox('warning', 'No mail server is configured (smtp_host), so no mail is sent until one is.'),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'sr-only' }, 'Email subscriptions'),
        h('thead', {}, h('tr', {}, ['Recipient', 'Events', 'Created', ''].map((c) => h('th', { scope: 'col' }, c || h('span', { class: 'sr-only' }, 'Actions'))))),
        h('tbody', {}, rows))) : h('p', { class: 'empty' }, 'No email subscriptions.'), emailForm);
  }

  loadSite();
  renderAccount();
  const reloads = { Stages: debounce(loadSite, 200), SiteRenamed: debounce(loadSite, 200) };
  if (isAdmin) {
    Object.assign(reloads, { User: debounce(loadUsers, 200), Token: debounce(loadTokens, 200),
      NatsCredential: debounce(loadCredentials, 200),
      Webhook: debounce(loadWebhooks, 200), Email: debounce(loadEmail, 200) });
    loadUsers();
    loadTokens();
    loadCredentials();
    loadWebhooks();
    loadEmail();
  }
  const unsubscribe = ctx.feed.subscribe((e) => {
    for (const [prefix, fn] of Object.entries(reloads)) if (e.type.startsWith(prefix)) fn();
  });
  return () => {
    unsubscribe();
    Object.values(reloads).forEach((fn) => fn.cancel());
  };
}
