// Small inline SVG charts: no library, no canvas.
import { esc } from './util.js';

/**
 * A sparkline of `values` (numbers or null for gaps) with its label, the
 * last value and the range, as an SVG string.
 */
export function sparkline(values, { label, unit = '', digits = 0, id = '' } = {}) {
  const w = 300, h = 64, pad = 4;
  const pts = values.map((v, i) => [i, v]).filter(([, v]) => v !== null && v !== undefined && Number.isFinite(v));
  const fmt = (v) => (v === undefined ? '–' : `${v.toFixed(digits)}${unit}`);
  if (pts.length < 2) {
    return `<figure class="chart" ${id ? `id="${esc(id)}"` : ''}><figcaption>${esc(label)}</figcaption>` +
      `<p class="muted small">Not enough blocks yet.</p></figure>`;
  }
  const ys = pts.map(([, v]) => v);
  const lo = Math.min(...ys), hi = Math.max(...ys);
  const span = hi - lo || 1;
  const n = Math.max(values.length - 1, 1);
  const x = (i) => pad + (i / n) * (w - 2 * pad);
  const y = (v) => h - pad - ((v - lo) / span) * (h - 2 * pad);
  const d = pts.map(([i, v], k) => `${k ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join('');
  const last = ys[ys.length - 1];
  const mean = ys.reduce((a, b) => a + b, 0) / ys.length;
  return `<figure class="chart" ${id ? `id="${esc(id)}"` : ''}>` +
    `<figcaption>${esc(label)} <b>${esc(fmt(last))}</b> <span class="muted small">mean ${esc(fmt(mean))} · ${esc(fmt(lo))}–${esc(fmt(hi))}</span></figcaption>` +
    `<svg viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" role="img" aria-label="${esc(label)}">` +
    `<path d="${d}" class="line"/>` +
    `<circle cx="${x(pts[pts.length - 1][0]).toFixed(1)}" cy="${y(last).toFixed(1)}" r="2.5" class="dot"/></svg></figure>`;
}

const KIND_ROW = { meta: 0, layer: 1, expert: 1, router: 1, data: 1, delta: 2 };

/**
 * The PoL DAG as an SVG: meta blocks on top, then layers, experts, routers
 * (and data), then deltas; an edge per dependency; heads outlined.
 */
export function dag(blocks, heads) {
  const perRow = 8, bw = 112, bh = 40, gx = 14, gy = 46, pad = 10;
  const rows = [[], [], []];
  const sorted = [...blocks].sort((a, b) =>
    (a.layer ?? -1) - (b.layer ?? -1) || (a.expert ?? -1) - (b.expert ?? -1) || String(a.id).localeCompare(String(b.id)));
  for (const b of sorted) rows[KIND_ROW[b.block_type] ?? 1].push(b);
  // Ids are 0x-hex; dependencies come as bare hex.
  const norm = (h) => (String(h).startsWith('0x') ? String(h) : `0x${h}`);
  const pos = new Map();
  let yCursor = pad;
  let width = 0;
  for (const row of rows) {
    if (!row.length) continue;
    const lines = Math.ceil(row.length / perRow);
    for (let l = 0; l < lines; l++) {
      const part = row.slice(l * perRow, (l + 1) * perRow);
      const lineW = part.length * bw + (part.length - 1) * gx;
      width = Math.max(width, lineW);
      part.forEach((b, i) => pos.set(b.id, { b, x: i * (bw + gx), y: yCursor, lineW }));
      yCursor += bh + gy / 2;
    }
    yCursor += gy / 2;
  }
  const W = width + 2 * pad;
  // Centre each line.
  for (const p of pos.values()) p.x += pad + (width - p.lineW) / 2;
  const H = yCursor;
  const edges = [];
  for (const { b, x, y } of pos.values()) {
    const parents = new Set((b.depends_on || []).map(norm));
    if (b.base_block) parents.add(norm(b.base_block));
    for (const parent of parents) {
      const p = pos.get(parent);
      if (!p) continue;
      const x1 = p.x + bw / 2, y1 = p.y + bh, x2 = x + bw / 2, y2 = y;
      const my = (y1 + y2) / 2;
      edges.push(`<path class="edge" d="M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}"/>`);
    }
  }
  const nodes = [...pos.values()].map(({ b, x, y }) => {
    const head = heads.has(b.id);
    const what = b.block_type === 'meta' ? 'meta'
      : `${b.block_type}${b.layer !== null && b.layer !== undefined ? ` ${b.layer}` : ''}${b.expert !== null && b.expert !== undefined ? `.${b.expert}` : ''}`;
    const v = b.version ? `v${b.version.major}.${b.version.minor}.${b.version.patch}` : '';
    return `<g class="pol-node ${esc(b.block_type)}${head ? ' head' : ''}" data-id="${esc(b.id)}">` +
      `<title>${esc(b.block_type)} ${esc(b.id)}${head ? ' (head)' : ''}</title>` +
      `<rect x="${x}" y="${y}" width="${bw}" height="${bh}" rx="6"/>` +
      `<text x="${x + bw / 2}" y="${y + 16}" text-anchor="middle" class="k">${esc(what)}</text>` +
      `<text x="${x + bw / 2}" y="${y + 31}" text-anchor="middle" class="v">${esc(v)}${head ? ' · head' : ''}</text></g>`;
  });
  return `<svg id="pol-dag" class="dag" viewBox="0 0 ${W} ${H}" width="${W}" role="img" aria-label="PoL DAG">` +
    `${edges.join('')}${nodes.join('')}</svg>`;
}
