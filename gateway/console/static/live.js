// Live page: the server's own metrics from /console/api/live, polled while the page is shown.

import { call } from './api.js';
import { lineChart } from './charts.js';
import { $, figures, fmt } from './dom.js';

const POLL_MS = 2000;
let charts = null;
let timer = null;

const ms = (s) => (s === null || s === undefined ? null : `${fmt(s * 1000, 1)} ms`);

function build() {
  const sec = (v) => (v === null ? '' : `${fmt(v, 3)}`);
  return {
    rate: lineChart($('#chart-live-rate'), ['tokens/s', 'requests/s']),
    queue: lineChart($('#chart-live-queue'), ['queue depth', 'running']),
    ttft: lineChart($('#chart-live-ttft'), ['p50', 'p95'], { fmtY: sec }),
    tpot: lineChart($('#chart-live-tpot'), ['p50', 'p95'], { fmtY: sec }),
    errors: lineChart($('#chart-live-errors'), ['429/s', 'errors/s']),
  };
}

async function tick() {
  try {
    const live = await call('/console/api/live');
    const pts = live.data;
    const col = (k) => pts.map((p) => p[k]);
    const xs = col('t');
    charts ??= build();
    charts.rate.update(xs, [col('tokens_per_s'), col('requests_per_s')]);
    charts.queue.update(xs, [col('queue_depth'), col('running')]);
    charts.ttft.update(xs, [col('ttft_p50'), col('ttft_p95')]);
    charts.tpot.update(xs, [col('tpot_p50'), col('tpot_p95')]);
    charts.errors.update(xs, [col('rejected_per_s'), col('errors_per_s')]);
    const last = pts[pts.length - 1] || {};
    $('#live-now').replaceWith(Object.assign(figures([
      ['Tokens/s', fmt(last.tokens_per_s, 1)], ['Requests/s', fmt(last.requests_per_s, 2)],
      ['Queue depth', fmt(last.queue_depth)], ['Running', fmt(last.running)],
      ['TTFT p50 / p95', `${ms(last.ttft_p50) ?? '—'} / ${ms(last.ttft_p95) ?? '—'}`],
      ['Per token p50 / p95', `${ms(last.tpot_p50) ?? '—'} / ${ms(last.tpot_p95) ?? '—'}`],
      ['429/s', fmt(last.rejected_per_s, 2)], ['Errors/s', fmt(last.errors_per_s, 2)],
      ['Samples', `${pts.length} (every ${live.interval_s} s)`],
    ]), { id: 'live-now' }));
  } catch (err) {
    window.fmgateNotice(`Live metrics: ${err.message}`);
  }
}

export function show() {
  stop();
  tick();
  timer = setInterval(tick, POLL_MS);
}

export function stop() {
  if (timer) clearInterval(timer);
  timer = null;
}
