// Sign in with a user name and password (a local account or the directory, as the server decides).

import { api } from '../api.js';
import { h, append, field, messageBox, replace, errorText, fmtDuration } from '../dom.js';

export function mount(main, ctx, { notice, kind = 'info', onSignedIn }) {
  const username = h('input', { type: 'text', name: 'username', autocomplete: 'username', required: true,
    autocapitalize: 'none', spellcheck: 'false' });
  const password = h('input', { type: 'password', name: 'password', autocomplete: 'current-password', required: true });
  const submit = h('button', { type: 'submit' }, 'Sign in');
  const feedback = h('div', { class: 'feedback' });
  let retryTimer = null;
  let locked = null;

  function holdBack() {
    const held = Boolean(locked && username.value.trim().toLowerCase() === locked.name && Date.now() < locked.until);
    submit.disabled = held;
    submit.textContent = held ? 'Sign in (wait)' : 'Sign in';
  }
  username.addEventListener('input', holdBack);

  const form = h('form', { class: 'signin-form', novalidate: true },
    field('User name', username).row,
    field('Password', password).row,
    h('div', { class: 'actions' }, submit),
    feedback);

  function fail(text) {
    replace(feedback, messageBox('error', text));
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (!username.value.trim() || !password.value) {
      fail(!username.value.trim() ? 'Enter your user name.' : 'Enter your password.');
      (username.value.trim() ? password : username).focus();
      return;
    }
    submit.disabled = true;
    submit.textContent = 'Signing in…';
    replace(feedback, messageBox('info', 'Signing in…'));
    try {
      const session = await api('POST', '/api/v1/session',
        { username: username.value.trim(), password: password.value }, { allow401: true });
      password.value = '';
      await onSignedIn(session);
      return;
    } catch (err) {
      password.value = '';
      if (err.status === 429) {
        const wait = err.retryAfter;
        if (!wait) {
          fail(errorText(err));
        } else {
          // The limit is per user name (and address): hold this name back until the server's time.
          locked = { name: username.value.trim().toLowerCase(), until: Date.now() + wait * 1000 };
          const at = new Date(locked.until).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
          const about = wait >= 60 ? `${Math.ceil(wait / 60)} min` : `${wait} s`;
          fail(`${errorText(err)}. Sign-in for ${username.value.trim()} opens again at ${at} (in about ${about}).`);
          clearTimeout(retryTimer);
          retryTimer = setTimeout(() => { locked = null; holdBack(); }, wait * 1000);
          holdBack();
          return;
        }
      } else {
        fail(errorText(err));
      }
      password.focus();
    }
    submit.disabled = false;
    submit.textContent = 'Sign in';
  });

  append(main, h('section', { class: 'signin' },
    h('div', { class: 'signin-brand' }, h('span', { class: 'logo', 'aria-hidden': 'true' }), 'ODST'),
    h('h1', {}, 'Sign in'),
    h('p', { class: 'hint' }, 'Open Distribution Server: packages for your Macs, on your own servers.'),
    notice ? messageBox(kind, notice) : null,
    form));
  username.focus();
  return () => clearTimeout(retryTimer);
}
