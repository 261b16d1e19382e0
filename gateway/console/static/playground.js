// Playground: streamed chat (fetch + ReadableStream SSE), sampling parameters, structured output and
// tools when switched on, an embeddings similarity table, and the last request as curl and Python.
// Everything the model returns is set as textContent.

import { errorOf, headers, keys, servedModels } from './api.js';
import { $, copyText, flash, fmt, h } from './dom.js';

let history = [];
let controller = null;

function numberOf(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

function jsonOf(id, what) {
  try {
    return JSON.parse($(id).value);
  } catch (err) {
    throw new Error(`${what} is not valid JSON: ${err.message}`);
  }
}

export function buildRequest(message) {
  const messages = [];
  const system = $('#pg-system').value.trim();
  if (system) messages.push({ role: 'system', content: system });
  messages.push(...history, { role: 'user', content: message });
  const body = { model: $('#pg-model').value, messages, stream: true, stream_options: { include_usage: true } };
  for (const [id, field] of [['#pg-temperature', 'temperature'], ['#pg-top-p', 'top_p'], ['#pg-max-tokens', 'max_tokens'],
    ['#pg-seed', 'seed'], ['#pg-presence', 'presence_penalty'], ['#pg-frequency', 'frequency_penalty']]) {
    const v = numberOf(id);
    if (v !== undefined && !Number.isNaN(v)) body[field] = v;
  }
  const stop = $('#pg-stop').value.split(',').map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  // Sent only when switched on, so servers without them are not asked.
  if ($('#pg-json-on').checked) {
    body.response_format = { type: 'json_schema', json_schema: { name: 'answer', schema: jsonOf('#pg-schema', 'The schema') } };
  }
  if ($('#pg-tools-on').checked) {
    body.tools = jsonOf('#pg-tools', 'The tools');
    body.tool_choice = 'auto';
  }
  return body;
}

function pyLiteral(v, indent = 4) {
  // JSON is almost Python: true/false/null differ.
  return JSON.stringify(v, null, indent).replace(/\btrue\b/g, 'True').replace(/\bfalse\b/g, 'False').replace(/\bnull\b/g, 'None');
}

export function snippets(path, body) {
  const url = `${location.origin}${path}`;
  const json = JSON.stringify(body, null, 2).replaceAll("'", "'\\''");
  const curl = `curl ${body.stream ? '-N ' : ''}${url} \\\n  -H "Authorization: Bearer $FMGATE_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '${json}'`;
  const { model, stream, ...rest } = body;
  const kwargs = Object.entries(rest).map(([k, v]) => `    ${k}=${pyLiteral(v).replace(/\n/g, '\n    ')},`).join('\n');
  let py;
  if (path.endsWith('/embeddings')) {
    py = `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("FMGATE_API_KEY", "unused"))\n` +
      `resp = client.embeddings.create(\n    model=${JSON.stringify(model)},\n${kwargs}\n)\nprint([len(d.embedding) for d in resp.data])\n`;
  } else {
    py = `import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("FMGATE_API_KEY", "unused"))\n` +
      `stream = client.chat.completions.create(\n    model=${JSON.stringify(model)},\n    stream=True,\n${kwargs}\n)\n` +
      'for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n        print(chunk.choices[0].delta.content, end="", flush=True)\nprint()\n';
  }
  $('#snippet-curl').textContent = curl;
  $('#snippet-python').textContent = py;
}

function bubble(role, text = '') {
  const body = h('p', { class: 'text', text });
  const li = h('li', { class: role, 'data-role': role }, h('span', { class: 'role', text: role }), body);
  $('#transcript').append(li);
  return body;
}

// Yields each parsed `data:` payload of a text/event-stream response.
export async function* sse(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const message = $('#pg-message').value;
  if (!message.trim() || controller) return;
  let body;
  try {
    body = buildRequest(message);
  } catch (err) {
    window.fmgateNotice(err.message);
    return;
  }
  snippets('/v1/chat/completions', body);
  bubble('user', message);
  const out = bubble('assistant');
  out.parentElement.setAttribute('aria-busy', 'true');
  $('#pg-message').value = '';
  controller = new AbortController();
  $('#pg-send').disabled = true;
  $('#pg-stop-btn').disabled = false;
  const stats = $('#pg-stats');
  stats.textContent = 'Waiting for the first token…';
  const t0 = performance.now();
  let first = null;
  let text = '';
  let finish = null;
  let usage = null;
  const calls = [];
  try {
    const res = await fetch('/v1/chat/completions', {
      method: 'POST', headers: headers(keys.api, true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) throw await errorOf(res);
    for await (const chunk of sse(res)) {
      if (chunk.error) throw new Error(chunk.error.message || 'The stream ended with an error.');
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const d = choice.delta || {};
        if (d.content) {
          first ??= performance.now();
          text += d.content;
          out.textContent = text;
        }
        for (const tc of d.tool_calls || []) {
          first ??= performance.now();
          const slot = (calls[tc.index ?? 0] ??= { name: '', arguments: '' });
          slot.name += tc.function?.name || '';
          slot.arguments += tc.function?.arguments || '';
          out.textContent = text + calls.map((c) => `\n→ ${c.name}(${c.arguments})`).join('');
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    history.push({ role: 'user', content: message }, { role: 'assistant', content: text });
    const secs = (performance.now() - t0) / 1000;
    stats.textContent = [
      finish ? `finish: ${finish}` : null,
      usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : null,
      first ? `first token ${fmt(first - t0)} ms` : null,
      `${fmt(secs, 2)} s`,
      usage && secs ? `${fmt(usage.completion_tokens / secs, 1)} tok/s` : null,
    ].filter(Boolean).join(' · ');
  } catch (err) {
    if (err.name === 'AbortError') {
      stats.textContent = 'Stopped.';
    } else {
      stats.textContent = '';
      window.fmgateNotice(`Chat failed: ${err.message}`);
      out.parentElement.classList.add('failed');
    }
  } finally {
    out.parentElement.removeAttribute('aria-busy');
    controller = null;
    $('#pg-send').disabled = false;
    $('#pg-stop-btn').disabled = true;
  }
}

function cosine(a, b) {
  let dot = 0; let na = 0; let nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / (Math.sqrt(na * nb) || 1);
}

async function embed(ev) {
  ev.preventDefault();
  const input = $('#emb-input').value.split('\n').map((s) => s.trim()).filter(Boolean).slice(0, 12);
  if (input.length < 2) { window.fmgateNotice('Give at least two sentences, one a line.'); return; }
  const body = { model: $('#emb-model').value, input };
  snippets('/v1/embeddings', body);
  try {
    const res = await fetch('/v1/embeddings', { method: 'POST', headers: headers(keys.api, true), body: JSON.stringify(body) });
    if (!res.ok) throw await errorOf(res);
    const vecs = (await res.json()).data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    const table = $('#emb-table');
    const label = (i) => `${i + 1}. ${input[i].length > 40 ? `${input[i].slice(0, 40)}…` : input[i]}`;
    table.tHead.replaceChildren(h('tr', {}, h('td'), input.map((_, i) => h('th', { scope: 'col', text: `${i + 1}` }))));
    table.tBodies[0].replaceChildren(...input.map((_, i) => h('tr', {}, h('th', { scope: 'row', text: label(i) }),
      input.map((__, j) => {
        const c = cosine(vecs[i], vecs[j]);
        const td = h('td', { class: 'num cosine', text: c.toFixed(3) });
        td.style.backgroundColor = `rgb(11 92 173 / ${Math.max(c, 0) * 0.45})`; // CSSOM, allowed by the CSP
        return td;
      }))));
    table.hidden = false;
  } catch (err) {
    window.fmgateNotice(`Embeddings failed: ${err.message}`);
  }
}

export async function show() {
  try {
    const models = await servedModels();
    for (const [sel, task] of [['#pg-model', 'chat'], ['#emb-model', 'embed']]) {
      const el = $(sel);
      const chosen = el.value;
      const names = models.filter((m) => (m.task || 'chat') === task).map((m) => m.id);
      el.replaceChildren(...names.map((n) => h('option', { value: n, text: n })));
      if (names.includes(chosen)) el.value = chosen;
    }
  } catch (err) {
    window.fmgateNotice(err.status === 401 ? 'The playground needs an API key: create one on the Keys page or sign in with one.'
      : `Could not list models: ${err.message}`);
  }
}

export function init() {
  $('#chat-form').addEventListener('submit', send);
  $('#embed-form').addEventListener('submit', embed);
  $('#pg-message').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) $('#chat-form').requestSubmit();
  });
  $('#pg-stop-btn').addEventListener('click', () => controller?.abort());
  $('#pg-clear').addEventListener('click', () => { history = []; $('#transcript').replaceChildren(); $('#pg-stats').textContent = ''; });
  for (const [box, area] of [['#pg-json-on', '#pg-schema'], ['#pg-tools-on', '#pg-tools']]) {
    $(box).addEventListener('change', () => { $(area).hidden = !$(box).checked; });
  }
  for (const btn of document.querySelectorAll('button.copy')) {
    btn.addEventListener('click', async () => flash(btn, (await copyText($(`#${btn.dataset.copy}`).textContent)) ? 'Copied' : 'Copy failed'));
  }
}
