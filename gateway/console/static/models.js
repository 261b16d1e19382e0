// Models page: what is served, in which variant, every candidate's figures and why the winner won.

import { call } from './api.js';
import { $, bytes, figures, fmt, h } from './dom.js';

const label = (k) => k.replace(/_s(_|$)/, '/s$1').replaceAll('_', ' ');

const when = (unix) => new Date(unix * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC';

function flat(obj) {
  if (!obj || typeof obj !== 'object') return obj === undefined || obj === null ? '' : String(obj);
  return Object.entries(obj)
    .filter(([, v]) => v !== null && v !== undefined && typeof v !== 'object')
    .map(([k, v]) => `${label(k)} ${typeof v === 'number' ? fmt(v, 4) : v}`)
    .join(' · ');
}

function candidatesTable(m) {
  const rows = m.candidates || m.variants || [];
  if (!Array.isArray(rows) || !rows.length) return null;
  const tbody = h('tbody');
  for (const c of rows) {
    const name = c.variant || c.name || '';
    const chosen = name === m.variant || c.chosen === true;
    const passes = c.passes ?? c.passed;
    tbody.append(h('tr', { class: chosen ? 'chosen' : null },
      h('th', { scope: 'row', text: chosen ? `${name} (chosen)` : name }),
      h('td', { class: passes === false ? 'fail' : passes === true ? 'pass' : null,
        text: passes === true ? 'passes' : passes === false ? 'fails' : '—' }),
      h('td', { text: c.verdict || '' }),
      h('td', { text: flat(c.quality) || '—' }),
      h('td', { text: flat(c.speed) || '—' }),
      h('td', { class: 'num', text: bytes(c.size_bytes ?? c.size) }),
      h('td', { text: c.reason || '' })));
  }
  return h('div', { class: 'table-wrap' }, h('table', {},
    h('caption', { text: `Candidates measured for ${m.id}` }),
    h('thead', {}, h('tr', {}, ['Variant', 'Gate', 'Verdict', 'Quality', 'Speed', 'Size', 'Reason'].map(
      (t) => h('th', { scope: 'col', text: t })))),
    tbody));
}

function actions(name, status, reload) {
  if (!status) return null;
  const run = async (verb, btn) => {
    btn.disabled = true;
    try {
      await call(`/admin/models/${encodeURIComponent(name)}/${verb}`, { method: 'POST', body: {} });
      await reload();
    } catch (err) {
      window.fmgateNotice(`Could not ${verb} ${name}: ${err.message}`);
      btn.disabled = false;
    }
  };
  const loaded = ['ready', 'loaded', 'in_use', 'idle'].includes(status.state);
  const verb = loaded ? 'Unload' : 'Load';
  const btn = h('button', { type: 'button', class: 'quiet', 'aria-label': `${verb} ${name}`, text: verb,
    onclick: () => run(loaded ? 'unload' : 'load', btn) });
  return h('div', { class: 'row' }, btn);
}

function card(m, status, reload) {
  const why = m.why || m.selection?.why || m.quality?.why;
  const hw = m.measured_on || m.hardware || m.selection?.hardware;
  return h('article', { class: 'card', 'data-model': m.id },
    h('h2', { text: m.id }),
    figures([
      ['Task', m.task],
      ['Variant', m.variant || status?.variant],
      ['State', status?.state || 'ready'],
      ['Memory', status?.memory_bytes ? bytes(status.memory_bytes) : null],
      ['Loads', status?.load ? `${status.load}${status.required ? ', required' : ''}` : null],
      ['Load took', status?.load_seconds ? `${fmt(status.load_seconds, 1)} s` : null],
      ['In use', status?.in_use ? fmt(status.in_use) : null],
      ['Unloads at', status?.expires_at ? when(status.expires_at) : null],
      ['Size', m.size_bytes ? bytes(m.size_bytes) : null],
      ['Context', m.max_model_len ? fmt(m.max_model_len) : null],
      ['Dimensions', m.dimensions ? fmt(m.dimensions) : null],
      ['Measured on', typeof hw === 'string' ? hw : hw ? flat(hw) : null],
      ...Object.entries(m.quality || {}).filter(([, v]) => typeof v === 'number')
        .map(([k, v]) => [label(k), fmt(v, 4)]),
      ['Error', status?.error || null],
    ]),
    why ? h('div', { class: 'why' }, h('strong', { text: 'Why this variant' }),
      h('ul', {}, String(why).split(/; (?=[\w.-]+: )/).map((part) => h('li', { text: part })))) : null,
    candidatesTable(m),
    actions(m.id, status, reload));
}

export async function show() {
  const list = $('#models-list');
  const reload = () => show();
  const [served, admin] = await Promise.all([
    call('/console/api/models'),
    call('/admin/models').catch(() => null), // older servers have no /admin/models
  ]);
  const statuses = new Map((admin?.data || admin?.models || []).map((s) => [s.name || s.id, s]));
  const hw = served.hardware;
  $('#hardware').textContent = hw
    ? `This machine: ${hw.cpu} (${hw.cores} cores, ${hw.isa_tier}${hw.gpus?.length ? `; ${hw.gpus.join(', ')}` : ''}).`
    : '';
  const cards = served.data.map((m) => card(m, statuses.get(m.id), reload));
  // Models the registry knows but does not serve right now (unloaded, loading, failed).
  for (const [name, s] of statuses) {
    if (!served.data.some((m) => m.id === name)) cards.push(card({ id: name, task: s.task, variant: s.variant }, s, reload));
  }
  list.replaceChildren(...(cards.length ? cards : [h('p', { text: 'No models are served yet.' })]));
}
