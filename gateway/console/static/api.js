// Talking to the gateway. Keys come from sessionStorage only and go out in the Authorization header.

const ADMIN = 'fmgate.adminKey';
const API = 'fmgate.apiKey';

export const keys = {
  get admin() { return sessionStorage.getItem(ADMIN) || ''; },
  set admin(v) { v ? sessionStorage.setItem(ADMIN, v) : sessionStorage.removeItem(ADMIN); },
  get api() { return sessionStorage.getItem(API) || ''; },
  set api(v) { v ? sessionStorage.setItem(API, v) : sessionStorage.removeItem(API); },
  clear() { sessionStorage.removeItem(ADMIN); sessionStorage.removeItem(API); },
};

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    } else if (body && body.detail) {
      message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
    }
  } catch { /* not JSON */ }
  return new ApiError(res.status, message, code);
}

export function headers(key, json = false) {
  const h = {};
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

// JSON call; `as` is 'admin', 'api' or null (no key).
export async function call(path, { as = 'admin', method = 'GET', body, signal } = {}) {
  const key = as === 'admin' ? keys.admin : as === 'api' ? keys.api : '';
  const res = await fetch(path, {
    method, signal, cache: 'no-store',
    headers: headers(key, body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw await errorOf(res);
  return res.status === 204 ? null : res.json();
}

// The models the playground can use: /v1/models with the API key, else the console's admin view.
export async function servedModels() {
  try {
    return (await call('/v1/models', { as: 'api' })).data;
  } catch (err) {
    if (err.status === 401 && keys.admin) return (await call('/console/api/models')).data;
    throw err;
  }
}
