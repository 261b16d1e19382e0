// Small wrappers over uPlot (vendored, static/vendor/uPlot.iife.min.js): time-series lines and stacked day bars.

const PALETTE = ['#0b5cad', '#c2410c', '#1b6b2f', '#8e44ad', '#a16207', '#0e7490', '#be123c'];
const HEIGHT = 220;

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || '#1a1a1a';
}

function axes(fmtY) {
  const stroke = cssVar('--fg');
  const grid = { stroke: cssVar('--line'), width: 1 };
  return [{ stroke, grid }, { stroke, grid, size: 60, values: fmtY ? (u, vals) => vals.map(fmtY) : undefined }];
}

function mount(el, opts, data) {
  el.replaceChildren();
  const u = new window.uPlot({ ...opts, width: Math.max(el.clientWidth, 280), height: HEIGHT }, data, el);
  new ResizeObserver(() => {
    if (el.clientWidth > 0) u.setSize({ width: el.clientWidth, height: HEIGHT });
  }).observe(el);
  return u;
}

// names: series labels; update(xs, ys[]) with xs in unix seconds.
export function lineChart(el, names, { fmtY } = {}) {
  const series = [{}, ...names.map((label, i) => ({ label, stroke: PALETTE[i % PALETTE.length], width: 2 }))];
  let u = null;
  return {
    update(xs, ys) {
      const data = [xs, ...ys];
      if (!u) u = mount(el, { series, axes: axes(fmtY), scales: { x: { time: true }, y: { range: (self, min, max) => [0, max > 0 ? max * 1.1 : 1] } }, legend: { live: true } }, data);
      else u.setData(data);
    },
  };
}

// Bars per UTC day, one colour per group, stacked (each drawn as the running sum, tallest first).
export function stackedDays(el) {
  let u = null;
  return {
    update(days, groups) {
      const names = Object.keys(groups);
      const xs = days.map((d) => Date.parse(`${d}T00:00:00Z`) / 1000);
      const sums = [];
      let run = days.map(() => 0);
      for (const n of names) {
        run = run.map((v, i) => v + (groups[n][i] || 0));
        sums.push(run);
      }
      const bars = window.uPlot.paths.bars({ size: [0.7, 48] });
      const series = [{}, ...names.map((label, i) => ({
        label, fill: PALETTE[i % PALETTE.length], stroke: PALETTE[i % PALETTE.length], paths: bars, points: { show: false },
      }))].reverse();
      series.unshift(series.pop()); // the x series stays first
      const data = [xs, ...sums.slice().reverse()];
      if (u) u.destroy();
      el.replaceChildren();
      if (!xs.length) {
        el.textContent = 'No usage recorded yet.';
        return;
      }
      const pad = 43200;
      u = mount(el, {
        series, legend: { live: false },
        axes: [{ ...axes()[0], incrs: [86400, 7 * 86400, 28 * 86400],
          values: (self, vals) => vals.map((v) => new Date(v * 1000).toISOString().slice(5, 10)) }, axes()[1]],
        scales: { x: { time: true, range: [Math.min(...xs) - pad, Math.max(...xs) + pad] }, y: { range: (self, min, max) => [0, Math.max(1, max * 1.1)] } },
      }, data);
    },
  };
}
