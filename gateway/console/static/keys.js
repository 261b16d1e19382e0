// Keys page: list, create (secret shown once), edit limits (PATCH), revoke, and usage charts.

import { call, keys } from './api.js';
import { stackedDays } from './charts.js';
import { $, copyText, flash, fmt, h } from './dom.js';

const LIMITS = [['rpm', 'rpm'], ['tpm', 'tpm'], ['tokens_per_day', '/day'], ['tokens_per_month', '/month'],
  ['max_concurrent', 'concurrent']];
let tokensChart = null;
let requestsChart = null;
let current = [];
let editing = null;
let armed = null; // the key whose Revoke was pressed once

const today = () => new Date().toISOString().slice(0, 10);

function numbers(form, names) {
  const out = {};
  for (const n of names) {
    const v = form.elements[n].value.trim();
    out[n] = v === '' ? null : Number(v);
  }
  return out;
}

function modelList(text) {
  const items = text.split(',').map((s) => s.trim()).filter(Boolean);
  return items.length ? items : null;
}

function limitsText(k) {
  const parts = LIMITS.filter(([f]) => k[f]).map(([f, unit]) => `${fmt(k[f])} ${unit}`);
  if (k.models) parts.push(`models: ${k.models.join(', ')}`);
  for (const [m, lim] of Object.entries(k.model_limits || {})) {
    const each = LIMITS.filter(([f]) => lim?.[f]).map(([f, unit]) => `${fmt(lim[f])} ${unit}`);
    if (each.length) parts.push(`${m}: ${each.join(', ')}`);
  }
  if (k.weight && k.weight !== 1) parts.push(`weight ${fmt(k.weight, 2)}`);
  if (k.expires_at) parts.push(`expires ${k.expires_at}`);
  if (k.owner) parts.push(`owner ${k.owner}`);
  if (k.tags?.length) parts.push(`tags ${k.tags.join(', ')}`);
  return parts.join(' · ') || 'no limits';
}

function budget(used, limit) {
  return limit ? `${fmt(used)} of ${fmt(limit)} (${fmt(Math.max(limit - used, 0))} left)` : fmt(used);
}

function renderKeys(list, usage) {
  const day = today();
  const month = day.slice(0, 7);
  const per = new Map();
  for (const r of usage) {
    const u = per.get(r.key_id) || { requests: 0, today: 0, month: 0 };
    u.requests += r.requests;
    if (r.date === day) u.today += r.total_tokens;
    if (r.date.startsWith(month)) u.month += r.total_tokens;
    per.set(r.key_id, u);
  }
  const rows = list.map((k) => {
    const u = per.get(k.id) || { requests: 0, today: 0, month: 0 };
    const revoked = Boolean(k.revoked_at);
    const edit = h('button', { type: 'button', class: 'quiet', text: 'Edit', 'aria-label': `Edit ${k.name}`,
      disabled: revoked, onclick: () => openEdit(k) });
    const revoke = h('button', { type: 'button', class: 'danger', text: armed === k.id ? 'Confirm revoke' : 'Revoke',
      'aria-label': `Revoke ${k.name}`, disabled: revoked });
    revoke.addEventListener('click', async () => {
      if (armed !== k.id) { // a second press confirms (kept across the page's refreshes); no blocking dialog
        armed = k.id;
        revoke.textContent = 'Confirm revoke';
        return;
      }
      armed = null;
      revoke.disabled = true;
      try {
        await call(`/admin/keys/${encodeURIComponent(k.id)}/revoke`, { method: 'POST' });
        await refresh();
      } catch (err) { window.fmgateNotice(`Could not revoke: ${err.message}`); }
    });
    return h('tr', { 'data-key-id': k.id },
      h('th', { scope: 'row', text: k.name }),
      h('td', {}, h('code', { text: k.id })),
      h('td', { text: limitsText(k) }),
      h('td', { class: 'num usage-requests', text: fmt(u.requests) }),
      h('td', { class: 'num usage-today', text: budget(u.today, k.tokens_per_day) }),
      h('td', { class: 'num', text: budget(u.month, k.tokens_per_month) }),
      h('td', { class: revoked ? 'fail' : 'pass', text: revoked ? `revoked ${k.revoked_at}` : 'active' }),
      h('td', {}, h('div', { class: 'row' }, edit, revoke)));
  });
  $('#keys-table tbody').replaceChildren(...(rows.length ? rows
    : [h('tr', {}, h('td', { colspan: '8', text: 'No keys yet. Create one above.' }))]));
}

function renderUsage(usage) {
  const sel = $('#usage-key');
  const rows = sel.value ? usage.filter((r) => r.key_id === sel.value) : usage;
  const days = [...new Set(rows.map((r) => r.date))].sort();
  const tokens = {};
  const requests = {};
  for (const r of rows) {
    const m = r.model || 'all models';
    tokens[m] ??= days.map(() => 0);
    requests[m] ??= days.map(() => 0);
    tokens[m][days.indexOf(r.date)] += r.total_tokens;
    requests[m][days.indexOf(r.date)] += r.requests;
  }
  tokensChart ??= stackedDays($('#chart-usage-tokens'));
  requestsChart ??= stackedDays($('#chart-usage-requests'));
  tokensChart.update(days, tokens);
  requestsChart.update(days, requests);
  $('#usage-table tbody').replaceChildren(...rows.slice().reverse().map((r) => h('tr', {},
    h('td', { text: r.date }), h('td', { text: r.key_name || r.key_id }), h('td', { text: r.model || '' }),
    h('td', { class: 'num', text: fmt(r.requests) }), h('td', { class: 'num', text: fmt(r.prompt_tokens) }),
    h('td', { class: 'num', text: fmt(r.completion_tokens) }), h('td', { class: 'num', text: fmt(r.total_tokens) }))));
}

function renderKeyChoice(list) {
  const sel = $('#usage-key');
  const chosen = sel.value;
  sel.replaceChildren(h('option', { value: '', text: 'All keys' }),
    ...list.map((k) => h('option', { value: k.id, text: `${k.name} (${k.id})` })));
  sel.value = list.some((k) => k.id === chosen) ? chosen : '';
}

let lastUsage = [];

function renderAudit(audit) {
  $('#audit').hidden = !audit;
  if (!audit) return;
  $('#audit-table tbody').replaceChildren(...audit.data.map((e) => h('tr', {},
    h('td', { text: e.at }), h('td', { text: e.action }), h('td', {}, h('code', { text: e.key_id || '' })),
    h('td', { text: e.actor || '' }),
    h('td', { text: typeof e.detail === 'string' ? e.detail : JSON.stringify(e.detail ?? {}) }))));
}

export async function refresh() {
  const [list, usage, audit] = await Promise.all([call('/admin/keys'), call('/admin/usage'),
    call('/admin/audit?limit=20').catch(() => null)]); // older servers have no audit log
  renderAudit(audit);
  current = list.data;
  lastUsage = usage.data;
  renderKeyChoice(current);
  renderKeys(current, lastUsage);
  renderUsage(lastUsage);
}

function openEdit(k) {
  editing = k;
  const f = $('#edit-form');
  f.elements.name.value = k.name || '';
  for (const [n] of LIMITS) f.elements[n].value = k[n] ?? '';
  f.elements.models.value = (k.models || []).join(', ');
  f.elements.expires_at.value = k.expires_at || '';
  f.elements.weight.value = k.weight ?? '';
  f.elements.owner.value = k.owner || '';
  f.elements.tags.value = (k.tags || []).join(', ');
  $('#edit-title').textContent = `Edit key ${k.name}`;
  $('#edit-dialog').showModal();
}

async function saveEdit(ev) {
  ev.preventDefault();
  const f = ev.target;
  const body = { name: f.elements.name.value.trim() || undefined, ...numbers(f, [...LIMITS.map(([n]) => n), 'weight']),
    models: modelList(f.elements.models.value), expires_at: f.elements.expires_at.value.trim() || null,
    owner: f.elements.owner.value.trim() || null, tags: modelList(f.elements.tags.value) || [] };
  try {
    await call(`/admin/keys/${encodeURIComponent(editing.id)}`, { method: 'PATCH', body });
    $('#edit-dialog').close();
    await refresh();
  } catch (err) {
    const unsupported = err.status === 404 && err.code !== 'key_not_found' || err.status === 405;
    window.fmgateNotice(unsupported ? 'This server cannot edit keys yet (no PATCH /admin/keys/{id}).'
      : `Could not save: ${err.message}`);
  }
}

async function create(ev) {
  ev.preventDefault();
  const f = ev.target;
  const body = { name: f.elements.name.value.trim(), models: modelList(f.elements.models.value) };
  for (const [n, v] of Object.entries(numbers(f, LIMITS.map(([x]) => x)))) if (v !== null) body[n] = v;
  try {
    const made = await call('/admin/keys', { method: 'POST', body });
    $('#secret-value').textContent = made.key;
    $('#secret-box').hidden = false;
    $('#secret-copy').focus();
    f.reset();
    await refresh();
  } catch (err) { window.fmgateNotice(`Could not create the key: ${err.message}`); }
}

export function init() {
  $('#create-form').addEventListener('submit', create);
  $('#edit-form').addEventListener('submit', saveEdit);
  $('#edit-cancel').addEventListener('click', () => $('#edit-dialog').close());
  $('#usage-key').addEventListener('change', () => renderUsage(lastUsage));
  $('#secret-copy').addEventListener('click', async (ev) => {
    flash(ev.target, (await copyText($('#secret-value').textContent)) ? 'Copied' : 'Copy failed');
  });
  $('#secret-use').addEventListener('click', () => {
    keys.api = $('#secret-value').textContent;
    location.hash = '#playground';
  });
  $('#secret-hide').addEventListener('click', () => {
    $('#secret-value').textContent = '';
    $('#secret-box').hidden = true;
  });
}
