// The shell: session, header, navigation, hash routes, and the one live event feed pages share.

import { api, get, setCsrfToken, onUnauthorized, EventFeed } from './api.js';
import { h, replace, clear, announce, errorText, debounce } from './dom.js';
import * as signin from './pages/signin.js';
import * as packages from './pages/packages.js';
import * as packageDetail from './pages/package.js';
import * as upload from './pages/upload.js';
import * as network from './pages/network.js';
import * as events from './pages/events.js';
import * as settings from './pages/settings.js';

const WRITE = ['admin', 'operator'];

const ROUTES = [
  { match: /^packages\/(.+)$/, page: packageDetail, nav: 'packages' },
  { match: /^(packages)?$/, page: packages, nav: 'packages' },
  { match: /^upload$/, page: upload, nav: 'upload', needs: 'write' },
  { match: /^network$/, page: network, nav: 'network' },
  { match: /^events$/, page: events, nav: 'events' },
  { match: /^settings$/, page: settings, nav: 'settings' },
];

const NAV = [
  ['packages', 'Packages'],
  ['upload', 'Upload', 'write'],
  ['network', 'Network'],
  ['events', 'Event log'],
  ['settings', 'Settings'],
];

const state = { session: null, settings: null, site: null, peers: [], settingsError: null, changingPassword: false };
const feed = new EventFeed();
let unmount = null;
let firstRender = true;
let returnTo = '';

const $ = (id) => document.getElementById(id);

export const ctx = {
  state,
  feed,
  can(what) {
    const role = state.session ? state.session.role : '';
    if (what === 'write') return WRITE.includes(role);
    if (what === 'admin') return role === 'admin';
    return Boolean(role);
  },
  // Every site this one knows: itself first, then its peers.
  // accepted: the stages a site replicates, when known (null: unknown, assume all).
  sites() {
    const mine = state.settings && state.settings.accepted_stages ? state.settings.accepted_stages : null;
    const self = state.site ? [{ site: state.site.site, name: state.site.name || '', self: true, accepted: mine }] : [];
    return self.concat(state.peers.map((p) => ({ site: p.site, name: p.name || '', self: false,
      accepted: Array.isArray(p.accepted_stages) ? p.accepted_stages : null })));
  },
  siteName(id) {
    const found = ctx.sites().find((s) => s.site === id);
    if (found && !found.name && found.self) return `this site (${id})`;
    return found && found.name ? `${found.name} (${id})` : id;
  },
  shortSiteName(id) {
    const found = ctx.sites().find((s) => s.site === id);
    if (found && !found.name && found.self) return 'this site';
    return found && found.name ? found.name : id;
  },
  stages() {
    if (state.settings && state.settings.stages) return state.settings.stages;
    return state.site && state.site.stages ? state.site.stages : ['dev', 'test', 'prod'];
  },
  renderHeader: () => renderHeader(),
  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  async refreshPeers() {
    try {
      const data = await get('/api/v1/peers');
      state.peers = data.peers || [];
    } catch { /* the pages that need peers show their own error */ }
    return state.peers;
  },
};

// ---- session

async function loadContext() {
  const [site, peers, settingsResult, position] = await Promise.allSettled([
    get('/api/v1/site'), get('/api/v1/peers'), get('/api/v1/settings'), get('/api/v1/events?limit=1'),
  ]);
  state.site = site.status === 'fulfilled' ? site.value : null;
  state.peers = peers.status === 'fulfilled' ? peers.value.peers || [] : [];
  state.settings = settingsResult.status === 'fulfilled' ? settingsResult.value : null;
  state.settingsError = settingsResult.status === 'rejected' ? errorText(settingsResult.reason) : null;
  return position.status === 'fulfilled' ? position.value.last_position : null;
}

// Look at the session again when it would expire unused, or when an event says this user changed:
// an ended session goes back to sign-in at once (with the reason), a new role redraws the page.
let sessionTimer = null;
function scheduleSessionCheck() {
  clearTimeout(sessionTimer);
  if (!state.session || !state.session.expires_at) return;
  const wait = Math.min(Math.max(state.session.expires_at - Date.now() + 2000, 5000), 2 ** 31 - 1);
  sessionTimer = setTimeout(checkSession, wait);
}

async function checkSession() {
  if (!state.session) return;
  let fresh;
  try {
    fresh = await get('/api/v1/session');
  } catch (err) {
    if (err.status !== 401) scheduleSessionCheck(); // a 401 has already ended the session
    return;
  }
  if (!state.session) return;
  const roleChanged = fresh.role !== state.session.role;
  state.session = fresh;
  setCsrfToken(fresh.csrf_token);
  scheduleSessionCheck();
  if (roleChanged) {
    announce(`Your role is now ${fresh.role}.`);
    renderHeader();
    route();
  }
}

async function startSession(session) {
  state.session = session;
  setCsrfToken(session.csrf_token);
  scheduleSessionCheck();
  const after = await loadContext();
  if (!state.session) return; // the session ended while loading
  renderHeader();
  feed.start(after);
  const target = returnTo;
  returnTo = '';
  if (target && target !== location.hash) location.hash = target;
  else route();
}

function endSession(notice, kind = 'info') {
  const wasSignedIn = Boolean(state.session);
  clearTimeout(sessionTimer);
  feed.stop();
  state.session = null;
  state.settings = null;
  state.site = null;
  state.peers = [];
  setCsrfToken('');
  if (wasSignedIn && location.hash && location.hash !== '#/signin') returnTo = location.hash;
  showSignin(notice, kind);
}

// Any 401 from the API: the session expired or was ended elsewhere.
function sessionExpired(err) {
  if (!state.session) return;
  endSession(`You were signed out: the server says “${errorText(err)}”. Sign in to continue where you were.`, 'warning');
}

async function signOut() {
  try {
    await api('DELETE', '/api/v1/session', undefined, { allow401: true });
  } catch (err) {
    if (err.status !== 401) {
      announce(`Sign-out failed: ${errorText(err)}`, 'error');
      return;
    }
  }
  returnTo = '';
  endSession('You have signed out.');
}

// ---- rendering

function showSignin(notice, kind) {
  if (unmount) unmount();
  unmount = null;
  $('topbar').hidden = true;
  clear($('nav'));
  const main = $('main');
  clear(main);
  unmount = signin.mount(main, ctx, { notice, kind, onSignedIn: startSession }) || null;
  document.title = 'Sign in · ODST';
  firstRender = false;
}

function renderHeader() {
  const { session, site } = state;
  $('topbar').hidden = false;
  const siteName = (state.settings && state.settings.site_name) || (site && site.name) || '';
  const siteId = (site && site.site) || (state.settings && state.settings.site_id) || '';
  // The name, with the id on hover; a site without a name says so (an admin can name it).
  if (siteName) replace($('site-label'), h('strong', {}, siteName));
  else if (ctx.can('admin')) replace($('site-label'), h('a', { href: '#/settings?tab=site', class: 'unnamed' }, 'Name this site'));
  else replace($('site-label'), h('span', { class: 'unnamed' }, 'Unnamed site'));
  $('site-label').title = `Site id ${siteId}`;
  const who = session.display_name || session.username;
  replace($('user-label'), h('span', { class: 'user-name' }, who),
    h('span', { class: `role role-${session.role}` }, session.role),
    session.source === 'ldap' ? h('span', { class: 'hint' }, ' (directory)') : null);
  $('user-label').title = `Signed in as ${session.username}`;
  const list = h('ul', {});
  for (const [key, label, needs] of NAV) {
    if (needs && !ctx.can(needs)) continue;
    list.append(h('li', {}, h('a', { href: `#/${key}`, dataset: { nav: key } }, label)));
  }
  replace($('nav'), list);
}

function renderLive(feedState) {
  const el = $('live');
  const words = { live: 'Live', connecting: 'Connecting…', reconnecting: 'Reconnecting…', stopped: 'Offline' };
  el.className = `live ${feedState}`;
  replace(el, h('span', { class: 'dot', 'aria-hidden': 'true' }), words[feedState] || feedState);
  el.title = feedState === 'live' ? 'Updates arrive as they happen' : 'Live updates paused: reconnecting to the event stream';
}

function route() {
  if (!state.session) return;
  const hash = location.hash || '#/';
  if (!hash.startsWith('#/')) return; // an in-page anchor such as the skip link
  const path = hash.slice(2).split('?')[0];
  let params = null;
  let found = null;
  for (const r of ROUTES) {
    const m = r.match.exec(path);
    if (m) { found = r; params = m.slice(1).map((p) => (p === undefined ? p : safeDecode(p))); break; }
  }
  if (unmount) unmount();
  unmount = null;
  const main = $('main');
  clear(main);
  for (const a of document.querySelectorAll('#nav a')) {
    if (found && a.dataset.nav === found.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!found) {
    main.append(h('h1', {}, 'Page not found'), h('p', {}, 'There is no page at this address. ',
      h('a', { href: '#/packages' }, 'Go to the packages.')));
  } else if (found.needs && !ctx.can(found.needs)) {
    main.append(h('h1', {}, 'Not available to your role'),
      h('p', {}, `Your role (${state.session.role}) cannot use this page.`));
  } else {
    unmount = found.page.mount(main, ctx, params || []) || null;
  }
  const h1 = main.querySelector('h1');
  const siteName = (state.site && state.site.name) || '';
  document.title = `${h1 ? h1.textContent : 'ODST'} · ODST${siteName ? ` ${siteName}` : ''}`;
  if (h1 && !firstRender) {
    h1.tabIndex = -1;
    h1.focus();
  }
  firstRender = false;
  renderUploadIndicator();
}

// While an upload runs and another page is open, the header shows its progress.
let uploadText = null;
function renderUploadIndicator() {
  const onUploadPage = location.hash.startsWith('#/upload');
  replace($('upload-indicator'), uploadText && !onUploadPage && state.session
    ? h('a', { href: '#/upload', class: 'pill info' }, uploadText) : null);
}

function safeDecode(s) {
  try { return decodeURIComponent(s); } catch { return s; }
}

// Names of sites change with peer events: keep the shared list fresh.
const refreshPeersSoon = debounce(() => ctx.refreshPeers(), 200);

async function boot() {
  onUnauthorized(sessionExpired);
  feed.onState(renderLive);
  feed.subscribe((e) => {
    if (e.type && (e.type.startsWith('Peer') || e.type === 'SiteRenamed')) refreshPeersSoon();
    if (e.type === 'SiteRenamed' && state.site && e.origin === state.site.site && e.envelope && e.envelope.event) {
      state.site.name = e.envelope.event.name;
      if (state.settings) state.settings.site_name = e.envelope.event.name;
      renderHeader();
    }
    const who = e.envelope && e.envelope.event ? e.envelope.event.username : null;
    // My own password change: its answer carries my new session; the event may arrive before it.
    const mine = e.type === 'UserPasswordChanged' && state.changingPassword;
    if (who && state.session && e.type.startsWith('User') && who.toLowerCase() === state.session.username.toLowerCase()
        && e.origin === (state.site && state.site.site) && !mine) checkSession();
  });
  $('signout').addEventListener('click', signOut);
  $('skip-link').addEventListener('click', (e) => {
    e.preventDefault();
    const h1 = $('main').querySelector('h1');
    const target = h1 || $('main');
    target.tabIndex = -1;
    target.focus();
  });
  window.addEventListener('hashchange', () => { if (state.session) route(); });
  upload.watch((text) => {
    uploadText = text;
    renderUploadIndicator();
  });
  try {
    const session = await api('GET', '/api/v1/session', undefined, { allow401: true });
    await startSession(session);
  } catch (err) {
    if (err.status === 401) showSignin();
    else showSignin(`The server could not say whether you are signed in: ${errorText(err)}`, 'error');
  }
}

boot();
