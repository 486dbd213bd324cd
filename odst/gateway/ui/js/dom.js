// DOM helpers: every piece of data goes in as text (textContent / attributes), never as HTML.

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = String(value);
    else if (key === 'on') for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'value' || key === 'checked' || key === 'disabled' ||
             key === 'max' || key === 'hidden' || key === 'open') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

let ids = 0;
export function uid(prefix = 'id') {
  ids += 1;
  return `${prefix}-${ids}`;
}

// A labelled form field: returns {row, input}.
export function field(label, input, hint) {
  input.id ||= uid('f');
  const hintEl = hint ? h('span', { class: 'hint', id: uid('hint') }, hint) : null;
  if (hintEl) input.setAttribute('aria-describedby', hintEl.id);
  const row = h('div', { class: 'field' }, h('label', { for: input.id }, label), input, hintEl);
  return { row, input, hint: hintEl };
}

export function select(options, value, props = {}) {
  const el = h('select', props);
  for (const opt of options) {
    const [v, text] = Array.isArray(opt) ? opt : [opt, opt];
    // defaultSelected too, so a form reset returns to this value rather than the first option
    el.append(h('option', { value: v, selected: v === value ? 'selected' : null }, text));
  }
  if (value !== undefined && value !== null) el.value = value;
  return el;
}

// ---- formatting

const UNITS = ['bytes', 'kB', 'MB', 'GB', 'TB', 'PB'];
const BINARY_UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

// n bytes in the largest unit of `units` (each `base` times the one before) it reaches;
// `number` writes the scaled value. '—' for no number, "1 byte" / "n bytes" below one unit.
function scaledBytes(n, base, units, number) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  if (n < base) return `${n} ${n === 1 ? 'byte' : 'bytes'}`;
  let i = 0;
  let v = n;
  while (v >= base && i < units.length - 1) { v /= base; i += 1; }
  return `${number(v)} ${units[i]}`;
}

const digits = (v) => v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2);

export function fmtBytes(n) {
  return scaledBytes(n, 1000, UNITS, digits);
}

// Limits and settings are powers of two (max_upload_bytes = 64 GiB): say them as the README does.
export function fmtBinaryBytes(n) {
  return scaledBytes(n, 1024, BINARY_UNITS, (v) => (Number.isInteger(v) ? v : digits(v)));
}

export function fmtRate(bytesPerSecond) {
  if (!bytesPerSecond) return '—';
  return `${(bytesPerSecond / 1e6).toFixed(bytesPerSecond >= 1e8 ? 0 : 1)} MB/s`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '—';
  const s = Math.max(0, Math.round(seconds));
  const parts = (big, bigUnit, small, smallUnit) => (small ? `${big} ${bigUnit} ${small} ${smallUnit}` : `${big} ${bigUnit}`);
  if (s < 60) return `${s} s`;
  if (s < 3600) return parts(Math.floor(s / 60), 'min', s % 60, 's');
  if (s < 86400) return parts(Math.floor(s / 3600), 'h', Math.floor((s % 3600) / 60), 'min');
  return parts(Math.floor(s / 86400), 'd', Math.floor((s % 86400) / 3600), 'h');
}

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

export function fmtTime(ms) {
  if (!ms) return '—';
  return dateFormat.format(new Date(ms));
}

export function fmtAgo(ms) {
  if (!ms) return 'never';
  return `${fmtDuration((Date.now() - ms) / 1000)} ago`;
}

export function time(ms) {
  return h('time', { datetime: ms ? new Date(ms).toISOString() : '' }, fmtTime(ms));
}

export function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many || `${one}s`}`;
}

// ---- messages

// A short-lived visible message, also read out by screen readers (the region is aria-live).
export function announce(message, kind = 'info') {
  const region = document.getElementById('toasts');
  if (!region) return;
  const toast = h('div', { class: `toast ${kind}` }, message);
  region.append(toast);
  setTimeout(() => toast.remove(), kind === 'error' ? 12000 : 6000);
}

// An inline message box; kind 'error' is role=alert so it is announced at once.
export function messageBox(kind, ...content) {
  return h('div', { class: `message ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, ...content);
}

export function errorText(err) {
  if (err && err.detail) return err.detail;
  return err && err.message ? err.message : String(err);
}

// ---- dialogs

// A modal confirmation with <dialog> (focus is trapped by the browser); resolves true/false.
export function confirmDialog({ title, body, confirm = 'OK', danger = false }) {
  return new Promise((resolve) => {
    const titleId = uid('dlg');
    const ok = h('button', { type: 'submit', value: 'ok', class: danger ? 'danger' : '' }, confirm);
    const cancel = h('button', { type: 'submit', value: 'cancel', class: 'secondary' }, 'Cancel');
    const dialog = h('dialog', { 'aria-labelledby': titleId },
      h('form', { method: 'dialog' },
        h('h2', { id: titleId }, title),
        typeof body === 'string' ? h('p', {}, body) : body,
        h('div', { class: 'actions' }, cancel, ok)));
    document.body.append(dialog);
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue === 'ok');
      dialog.remove();
    });
    dialog.showModal();
    cancel.focus();
  });
}

// A modal form: fields [{name, label, type, autocomplete, hint}] → resolves {name: value} or null.
export function formDialog({ title, intro, fields, confirm = 'Save', validate, username }) {
  return new Promise((resolve) => {
    const titleId = uid('dlg');
    const inputs = {};
    const error = h('p', { class: 'field-error', role: 'alert' });
    const rows = fields.map((f) => {
      const input = h('input', { type: f.type || 'text', name: f.name, autocomplete: f.autocomplete || 'off', required: true });
      inputs[f.name] = input;
      return field(f.label, input, f.hint).row;
    });
    const ok = h('button', { type: 'submit' }, confirm);
    const cancel = h('button', { type: 'button', class: 'secondary' }, 'Cancel');
    // A password form names its account (for password managers), hidden.
    const account = username ? h('input', { type: 'text', autocomplete: 'username', value: username, hidden: true, tabindex: '-1' }) : null;
    const form = h('form', { method: 'dialog', novalidate: true }, h('h2', { id: titleId }, title),
      intro ? h('p', {}, intro) : null, account, rows, error, h('div', { class: 'actions' }, cancel, ok));
    const dialog = h('dialog', { 'aria-labelledby': titleId }, form);
    let result = null;
    form.addEventListener('submit', (e) => {
      const values = Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value]));
      const problem = validate ? validate(values) : null;
      if (problem) {
        e.preventDefault();
        error.textContent = problem;
        return;
      }
      result = values;
    });
    cancel.addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => { resolve(result); dialog.remove(); });
    document.body.append(dialog);
    dialog.showModal();
    inputs[fields[0].name].focus();
  });
}

// ---- clipboard

async function writeClipboard(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return true;
  }
  return false;
}

// A "Copy" button for a value; if the clipboard is unavailable (plain http), the value is selected instead.
export function copyButton(getText, label, target) {
  const button = h('button', { type: 'button', class: 'copy secondary small', 'aria-label': label }, 'Copy');
  button.addEventListener('click', async () => {
    const text = typeof getText === 'function' ? getText() : getText;
    let copied = false;
    try { copied = await writeClipboard(text); } catch { copied = false; }
    if (copied) {
      button.textContent = 'Copied';
      announce(`${label.replace(/^Copy /, '')} copied to the clipboard`);
      setTimeout(() => { button.textContent = 'Copy'; }, 2000);
    } else if (target) {
      const range = document.createRange();
      range.selectNodeContents(target);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      announce('The clipboard is not available on this connection: the value is selected, press ⌘C or Ctrl+C');
    } else {
      announce('The clipboard is not available on this connection', 'error');
    }
  });
  return button;
}

// A value with a copy button next to it.
export function copyable(value, label, className = 'mono') {
  const code = h('code', { class: className }, value);
  return h('span', { class: 'copyable' }, code, copyButton(value, `Copy ${label}`, code));
}

// A secret that the server shows once: visible, selectable, with a copy button and a warning.
export function secretBox(title, secret, note) {
  return messageBox('success',
    h('p', {}, h('strong', {}, title)),
    h('p', { class: 'secret' }, copyable(secret, title)),
    h('p', { class: 'hint' }, note || 'Copy it now: it is shown only once and cannot be retrieved later.'));
}

// ---- tables

// A table with a caption and column headers (<th scope="col">).
export function table(caption, columns, rows, { captionHidden = true, className = '' } = {}) {
  const thead = h('thead', {}, h('tr', {}, columns.map((c) => (c instanceof Node ? c : h('th', { scope: 'col' }, c)))));
  return h('table', { class: className },
    h('caption', { class: captionHidden ? 'sr-only' : '' }, caption),
    thead, h('tbody', {}, rows));
}

// A status pill with its words (colour is never the only signal).
export function pill(text, kind) {
  return h('span', { class: `pill ${kind || ''}` }, text);
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}
