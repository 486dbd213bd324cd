// Upload: pick or drop a file, choose its stage, watch real progress, cancel at any time.
// The File object is handed to XMLHttpRequest as is: the browser streams it from disk.

import { get, pkgPath, uploadFile } from '../api.js';
import { h, append, field, select, replace, messageBox, errorText, fmtBytes, fmtBinaryBytes, fmtRate, fmtDuration, copyable, uid } from '../dom.js';

const DEFAULT_EXTENSIONS = ['.pkg', '.dmg', '.zip', '.mpkg'];
const MAX_NAME_BYTES = 255;

// One upload at a time, kept while the user visits other pages.
const job = { state: 'idle' };
const watchers = new Set();
let repaint = null;

export function watch(fn) {
  watchers.add(fn);
  return () => watchers.delete(fn);
}

function changed() {
  const busy = job.state === 'checking' || job.state === 'sending' || job.state === 'processing';
  const text = busy ? `Uploading ${job.total ? Math.floor((100 * job.loaded) / job.total) : 0} %` : null;
  for (const fn of watchers) fn(text);
  if (repaint) repaint();
}

window.addEventListener('beforeunload', (e) => {
  if (job.state === 'sending' || job.state === 'processing') e.preventDefault();
});

// The same rules the server applies (odst/naming.py), so a bad name is caught before any byte is sent.
export function nameProblem(name, extensions) {
  if (!name) return 'Enter a name.';
  if (new TextEncoder().encode(name).length > MAX_NAME_BYTES) return `The name is longer than ${MAX_NAME_BYTES} bytes.`;
  if (name.includes('/') || name.includes('\\')) return 'The name must not contain / or \\.';
  if (name.includes('..')) return 'The name must not contain “..”.';
  if (name.startsWith('.')) return 'The name must not start with a dot.';
  if (name !== name.trim()) return 'The name must not start or end with a space.';
  if (/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(name)) return 'The name must not contain control characters.';
  const lower = name.toLowerCase();
  if (!extensions.some((ext) => lower.endsWith(ext) && lower.length > ext.length)) {
    return `The name must end with ${extensions.join(', ')}.`;
  }
  return null;
}

function rate() {
  const s = job.samples;
  if (s.length < 2) return 0;
  const [t0, b0] = s[0];
  const [t1, b1] = s[s.length - 1];
  return t1 > t0 ? ((b1 - b0) * 1000) / (t1 - t0) : 0;
}

async function start(file, name, stage, settings) {
  Object.assign(job, { state: 'checking', file, name, stage, loaded: 0, total: file.size, samples: [],
    started: performance.now(), result: null, error: null, abort: null, cancelled: false });
  changed();
  // Refuse early what the server would refuse after the whole file was sent.
  const max = settings ? settings.max_upload_bytes : null;
  if (max && file.size > max) {
    fail(`${file.name} is ${fmtBinaryBytes(file.size)}; this server accepts at most ${fmtBinaryBytes(max)} (max_upload_bytes).`, 413);
    return;
  }
  try {
    const existing = await get(pkgPath(name));
    if (existing.size !== file.size) {
      fail(`A different package named ${name} exists (${fmtBytes(existing.size)}, SHA1 ${existing.sha1}). `
        + 'Delete it first or choose another name.', 409);
      return;
    }
  } catch (err) {
    if (err.status === 401) { fail(errorText(err), 401); return; }
    // 404 is the usual case; anything else the upload itself will report
  }
  if (job.cancelled) { finishCancelled(); return; }
  job.state = 'sending';
  const upload = uploadFile({
    name, file, stage,
    onProgress(loaded, total) {
      job.loaded = loaded;
      job.total = total || file.size;
      const now = performance.now();
      job.samples.push([now, loaded]);
      while (job.samples.length > 2 && now - job.samples[0][0] > 5000) job.samples.shift();
      changed();
    },
    onSent() {
      job.loaded = job.total;
      job.state = 'processing';
      changed();
    },
  });
  job.abort = upload.abort;
  changed();
  try {
    const result = await upload.promise;
    job.state = 'done';
    job.result = result;
    job.elapsed = (performance.now() - job.started) / 1000;
    changed();
  } catch (err) {
    if (err.code === 'cancelled') finishCancelled();
    else fail(errorText(err), err.status);
  }
}

function fail(text, status) {
  job.state = 'failed';
  job.error = { text, status };
  changed();
}

function finishCancelled() {
  job.state = 'cancelled';
  changed();
}

function cancel() {
  job.cancelled = true;
  if (job.abort) job.abort();
  else finishCancelled();
}

export function mount(main, ctx) {
  const settings = ctx.state.settings;
  const extensions = settings && settings.allowed_extensions ? settings.allowed_extensions : DEFAULT_EXTENSIONS;
  const stages = ctx.stages();
  const defaultStage = settings && settings.default_stage ? settings.default_stage : stages[stages.length - 1];
  let chosen = null;

  const fileInput = h('input', { type: 'file', id: uid('file'), class: 'file-input' });
  const nameInput = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false' });
  const stageSelect = select(stages, defaultStage);
  const nameHint = `Must end with ${extensions.join(', ')}.` + (settings ? ` At most ${fmtBinaryBytes(settings.max_upload_bytes)}.` : '');
  const nameField = field('Name on the server', nameInput, nameHint);
  const nameError = h('p', { class: 'field-error', id: uid('err'), 'aria-live': 'polite' });
  const submit = h('button', { type: 'submit' }, 'Upload');
  const chosenText = h('p', { class: 'chosen', 'aria-live': 'polite' }, 'No file chosen.');
  const zone = h('div', { class: 'dropzone' },
    h('p', { class: 'drop-title' }, 'Drop a package here'),
    h('p', {}, 'or ', fileInput, h('label', { for: fileInput.id, class: 'button secondary file-label' }, 'Choose a file…')),
    chosenText);
  const form = h('form', { class: 'upload-form', novalidate: true },
    zone, nameField.row, nameError,
    field('Stage', stageSelect, `Sites replicate the stages they accept. Default: ${defaultStage}.`).row,
    h('div', { class: 'actions' }, submit));
  const panel = h('section', { class: 'upload-panel', 'aria-label': 'Upload progress' });
  const settingsNote = settings ? null : messageBox('warning',
    `The site settings could not be read (${ctx.state.settingsError || 'unknown error'}); the server still checks every upload.`);
  const about = h('aside', { class: 'card about', 'aria-label': 'About uploads' },
    h('h2', {}, 'What happens'),
    h('ol', {},
      h('li', {}, 'The file streams to this site straight from disk; large files are fine.'),
      h('li', {}, 'The server computes SHA1 (whole file and every 1 MiB chunk), SHA-512 and BLAKE3 in one pass.'),
      h('li', {}, 'It is published at once here; every site whose stages include the chosen one pulls a verified copy.')),
    h('p', { class: 'hint' }, 'Closing this tab stops an upload that is still sending; nothing half-sent is ever published.'));
  append(main, h('h1', {}, 'Upload a package'), settingsNote,
    h('div', { class: 'upload-layout' }, h('div', {}, form, panel), about));

  function setFile(file) {
    chosen = file;
    replace(chosenText, file ? [h('strong', {}, file.name), ` · ${fmtBytes(file.size)}`] : 'No file chosen.');
    if (file) nameInput.value = file.name;
    validate();
  }

  function validate() {
    const problem = nameInput.value ? nameProblem(nameInput.value, extensions) : null;
    nameError.textContent = problem || '';
    if (problem) {
      nameInput.setAttribute('aria-invalid', 'true');
      nameInput.setAttribute('aria-describedby', `${nameField.hint.id} ${nameError.id}`);
    } else {
      nameInput.removeAttribute('aria-invalid');
      nameInput.setAttribute('aria-describedby', nameField.hint.id);
    }
    updateSubmit(problem);
    return problem;
  }

  // Upload is offered only when it would do something: not while the name is invalid, not
  // while an upload runs, and not again for the file and name that were just uploaded.
  function updateSubmit(problem = nameInput.value ? nameProblem(nameInput.value, extensions) : null) {
    const justDone = job.state === 'done' && chosen === job.file && nameInput.value === job.name;
    submit.disabled = busy() || Boolean(problem) || justDone;
    submit.title = justDone ? 'Already uploaded: choose another file or name, or Upload another' : '';
  }

  fileInput.addEventListener('change', () => setFile(fileInput.files[0] || null));
  nameInput.addEventListener('input', validate);

  // Drops anywhere on the page land in the form instead of opening the file in the tab.
  const onDragOver = (e) => { e.preventDefault(); zone.classList.add('over'); };
  const onDragLeave = () => zone.classList.remove('over');
  const onDrop = (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file && !busy()) setFile(file);
  };
  window.addEventListener('dragover', onDragOver);
  window.addEventListener('dragleave', onDragLeave);
  window.addEventListener('drop', onDrop);

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (busy()) return;
    if (!chosen) {
      nameError.textContent = 'Choose a file first.';
      fileInput.focus();
      return;
    }
    if (!nameInput.value) nameInput.value = chosen.name;
    if (validate()) { nameInput.focus(); return; }
    start(chosen, nameInput.value, stageSelect.value, settings);
  });

  function busy() {
    return job.state === 'checking' || job.state === 'sending' || job.state === 'processing';
  }

  // The panel is built once per state; progress ticks only update its numbers.
  let shownState = null;
  let progress = null;
  let numbers = null;
  let statusLine = null;
  function paint() {
    const running = busy();
    for (const el of [fileInput, nameInput, stageSelect]) el.disabled = running;
    updateSubmit();
    zone.classList.toggle('disabled', running);
    if (job.state !== shownState) {
      shownState = job.state;
      buildPanel();
    }
    if (progress && job.total !== undefined) {
      progress.max = Math.max(job.total, 1);
      progress.value = job.loaded;
      const pct = job.total ? Math.floor((100 * job.loaded) / job.total) : 0;
      const r = rate();
      const eta = r > 0 ? (job.total - job.loaded) / r : null;
      numbers.textContent = `${fmtBytes(job.loaded)} of ${fmtBytes(job.total)} (${pct} %) · ${fmtRate(r)}`
        + (job.state === 'sending' ? ` · ${eta === null ? 'estimating time left' : `about ${fmtDuration(eta)} left`}` : '');
    }
  }

  function buildPanel() {
    progress = null;
    numbers = null;
    statusLine = null;
    const name = job.name;
    if (job.state === 'idle') { replace(panel); return; }
    if (busy()) {
      const progressId = uid('progress');
      progress = h('progress', { id: progressId, max: Math.max(job.total, 1), value: 0 });
      numbers = h('p', { class: 'numbers' });
      const words = { checking: `Checking ${name}…`, sending: `Uploading ${name}…`,
        processing: `All ${fmtBytes(job.total)} sent. The server is verifying the hashes and publishing ${name}…` };
      statusLine = h('p', { class: 'status-line', role: 'status' }, words[job.state]);
      const cancelButton = h('button', { type: 'button', class: 'secondary' }, 'Cancel upload');
      cancelButton.addEventListener('click', cancel);
      replace(panel,
        h('h2', {}, 'Progress'),
        h('label', { for: progressId }, `${name} → stage ${job.stage}`),
        progress, numbers, statusLine,
        h('div', { class: 'actions' }, cancelButton));
      return;
    }
    const again = h('button', { type: 'button', class: 'secondary' }, 'Upload another');
    again.addEventListener('click', () => {
      job.state = 'idle';
      setFile(null);
      fileInput.value = '';
      nameInput.value = '';
      changed();
      fileInput.focus();
    });
    if (job.state === 'done') {
      const pkg = job.result.package || {};
      const same = job.result.status === 200;
      replace(panel, messageBox('success',
        h('p', {}, h('strong', {}, same ? `${name} was already on the server with identical content: nothing changed.`
          : `Uploaded ${name} (${fmtBytes(pkg.size)}) in ${fmtDuration(job.elapsed)}.`)),
        h('p', {}, h('a', { href: `#/packages/${encodeURIComponent(name)}`, class: 'button' }, `View ${name}`)),
        h('dl', { class: 'hashes' },
          h('dt', {}, 'SHA1'), h('dd', {}, copyable(pkg.sha1 || '', `SHA1 of ${name}`)),
          h('dt', {}, 'SHA-512'), h('dd', {}, copyable(pkg.sha512 || '', `SHA-512 of ${name}`)))),
      h('div', { class: 'actions' }, again));
    } else if (job.state === 'cancelled') {
      replace(panel, messageBox('warning', h('p', {}, h('strong', {}, `Upload of ${name} cancelled`),
        ' at ', `${fmtBytes(job.loaded)} of ${fmtBytes(job.total)}: nothing was published.`)),
      h('div', { class: 'actions' }, again));
    } else if (job.state === 'failed') {
      const status = job.error.status ? ` (HTTP ${job.error.status})` : '';
      replace(panel, messageBox('error', h('p', {}, h('strong', {}, `Upload of ${name} failed${status}`)),
        h('p', {}, job.error.text)),
      h('div', { class: 'actions' }, again));
    }
  }

  if (job.state !== 'idle' && job.file) {
    chosen = job.file;
    replace(chosenText, h('strong', {}, job.file.name), ` · ${fmtBytes(job.file.size)}`);
    nameInput.value = job.name;
    stageSelect.value = job.stage;
  }
  repaint = paint;
  paint();
  return () => {
    repaint = null;
    window.removeEventListener('dragover', onDragOver);
    window.removeEventListener('dragleave', onDragLeave);
    window.removeEventListener('drop', onDrop);
  };
}
