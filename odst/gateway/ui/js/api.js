// The Admin API client: JSON calls with the session cookie and CSRF header, uploads with
// progress (XMLHttpRequest: fetch has no upload progress), and the live event stream.

export class ApiError extends Error {
  constructor(status, code, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

const FALLBACK = {
  400: 'The server refused the request as invalid.',
  401: 'You are not signed in, or your session has expired.',
  403: 'Your role may not do this.',
  404: 'Not found.',
  409: 'Conflict: a different package with this name exists.',
  413: 'Too large: the server does not accept uploads this big (max_upload_bytes).',
  415: 'This file type is not accepted (allowed_extensions).',
  429: 'Too many attempts; wait and try again.',
  502: 'The server is unreachable (bad gateway).',
  503: 'The server is unavailable; try again shortly.',
  507: 'The server’s store is full: free space or raise its disk before uploading.',
};

let csrfToken = '';
let unauthorizedHandler = null;

export function setCsrfToken(token) { csrfToken = token || ''; }
export function onUnauthorized(fn) { unauthorizedHandler = fn; }

function parseBody(text) {
  if (!text) return null;
  try { return JSON.parse(text); } catch { return null; }
}

// The server's own words first ({"error": code, "detail": text}); a generic text only when it gave none.
function toError(status, statusText, data, text, retryAfter) {
  let detail = data && typeof data.detail === 'string' && data.detail ? data.detail : '';
  if (!detail && text && !data && text.length < 300 && !/^\s*</.test(text)) detail = text.trim();
  if (!detail) detail = FALLBACK[status] || `The server answered ${status} ${statusText || ''}`.trim();
  const code = (data && data.error) || `http_${status}`;
  const seconds = retryAfter !== null && retryAfter !== undefined && /^\d+$/.test(retryAfter)
    ? Number(retryAfter) : null;
  return new ApiError(status, code, detail, seconds);
}

function expired(err) {
  if (err.status === 401 && unauthorizedHandler) unauthorizedHandler(err);
}

export async function api(method, path, body, { signal, allow401 = false } = {}) {
  const headers = { Accept: 'application/json' };
  let payload;
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  if (method !== 'GET' && method !== 'HEAD' && csrfToken) headers['X-CSRF-Token'] = csrfToken;
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, credentials: 'same-origin', cache: 'no-store', signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'The server could not be reached. Check the network connection and try again.');
  }
  const text = await res.text();
  const data = parseBody(text);
  if (!res.ok) {
    const err = toError(res.status, res.statusText, data, text, res.headers.get('Retry-After'));
    if (!allow401) expired(err);
    throw err;
  }
  return data;
}

export const get = (path, opts) => api('GET', path, undefined, opts);

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

export const pkgPath = (name) => `/api/v1/packages/${encodeURIComponent(name)}`;

// PUT the File object itself: the browser streams it from disk, it is never read into memory.
export function uploadFile({ name, file, stage, replace = false, onProgress, onSent }) {
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    xhr.open('PUT', pkgPath(name) + query({ stage, replace: replace ? 'true' : undefined }));
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.setRequestHeader('Accept', 'application/json');
    if (csrfToken) xhr.setRequestHeader('X-CSRF-Token', csrfToken);
    xhr.upload.addEventListener('progress', (e) => onProgress && onProgress(e.loaded, e.lengthComputable ? e.total : file.size));
    xhr.upload.addEventListener('load', () => onSent && onSent());
    xhr.addEventListener('load', () => {
      const data = parseBody(xhr.responseText);
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve({ status: xhr.status, package: data });
        return;
      }
      const err = toError(xhr.status, xhr.statusText, data, xhr.responseText, xhr.getResponseHeader('Retry-After'));
      expired(err);
      reject(err);
    });
    xhr.addEventListener('error', () => reject(new ApiError(0, 'network',
      'The connection to the server was lost during the upload, so nothing was published. '
      + 'Check the network (or whether the server refused the file) and upload again.')));
    xhr.addEventListener('abort', () => reject(new ApiError(0, 'cancelled', 'Upload cancelled: nothing was published.')));
    xhr.send(file);
  });
  return { promise, abort: () => xhr.abort() };
}

// The live event log: Server-Sent Events read with fetch (so a 401 can be told apart from a
// network drop), resumed after the last position seen whenever the connection comes back.
export class EventFeed {
  constructor() {
    this.listeners = new Set();
    this.stateListeners = new Set();
    this.last = null;
    this.state = 'stopped';
    this.stopped = true;
    this.controller = null;
  }

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  onState(fn) {
    this.stateListeners.add(fn);
    fn(this.state);
    return () => this.stateListeners.delete(fn);
  }

  setState(state) {
    this.state = state;
    for (const fn of this.stateListeners) fn(state);
  }

  start(after) {
    this.stop();
    this.last = after;
    this.stopped = false;
    this.loop();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async loop() {
    let delay = 1000;
    while (!this.stopped) {
      this.controller = new AbortController();
      this.setState(this.state === 'live' ? 'reconnecting' : 'connecting');
      try {
        const url = '/api/v1/events/stream' + query({ after: this.last, brief: 'true' });
        const res = await fetch(url, { headers: { Accept: 'text/event-stream' }, credentials: 'same-origin',
          cache: 'no-store', signal: this.controller.signal });
        if (res.status === 401) {
          const text = await res.text();
          this.stopped = true;
          expired(toError(401, res.statusText, parseBody(text), text, null));
          break;
        }
        if (res.ok) {
          this.setState('live');
          delay = 1000;
          await this.read(res.body);
        }
      } catch {
        // the connection dropped (or stop() aborted it): retry below unless stopped
      }
      if (this.stopped) break;
      this.setState('reconnecting');
      await new Promise((resolve) => { setTimeout(resolve, delay); });
      delay = Math.min(delay * 2, 15000);
    }
    this.setState('stopped');
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let data = [];
    let id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buffer);
        if (!m || (m[0] === '\r' && m.index === buffer.length - 1)) break; // a CR may be half of CRLF
        const line = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line === '') {
          if (data.length) this.dispatch(id, data.join('\n'));
          data = [];
          id = null;
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const key = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? '' : line.slice(colon + 1);
          if (val.startsWith(' ')) val = val.slice(1);
          if (key === 'data') data.push(val);
          else if (key === 'id') id = val;
        }
      }
    }
  }

  dispatch(id, text) {
    let event;
    try { event = JSON.parse(text); } catch { return; }
    if (id !== null && /^\d+$/.test(id)) this.last = Number(id);
    else if (event && Number.isInteger(event.position)) this.last = event.position;
    for (const fn of this.listeners) {
      try { fn(event); } catch (e) { console.error(e); } // eslint-disable-line no-console
    }
  }
}
