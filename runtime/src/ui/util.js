// Helpers shared by the explorer's pages (no dependencies, no build step).

/** HTML-escapes any value. */
export function esc(v) {
  return String(v ?? '').replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);
}

/** An API error with the node's reason. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.reason = body && body.reason;
  }
}

/** GET a JSON route of this node. */
export async function api(path, init) {
  const r = await fetch(path, { headers: { accept: 'application/json' }, ...init });
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

/** Base units (a decimal string, 10^18 per BLY) as a BLY decimal. */
export function bly(baseUnits, digits = 6) {
  if (baseUnits === null || baseUnits === undefined) return '–';
  let s = String(baseUnits);
  if (!/^\d+$/.test(s)) return s;
  s = s.padStart(19, '0');
  const whole = s.slice(0, -18).replace(/^0+(?=\d)/, '');
  let frac = s.slice(-18, -18 + digits).replace(/0+$/, '');
  if (!frac && /[1-9]/.test(s.slice(-18))) frac = s.slice(-18).replace(/0+$/, '').slice(0, 18);
  return frac ? `${Number(whole).toLocaleString('en-US')}.${frac}` : Number(whole).toLocaleString('en-US');
}

/** A long hex id shortened for tables. */
export function short(h, n = 10) {
  const s = String(h ?? '');
  return s.length > 2 * n + 2 ? `${s.slice(0, n + 2)}…${s.slice(-6)}` : s;
}

/** Milliseconds as a short duration. */
export function dur(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3600000) return `${Math.floor(ms / 60000)} min ${Math.floor((ms % 60000) / 1000)} s`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

export const blockLink = (h, text) =>
  `<a class="block-link" href="#/block/${esc(h)}">${esc(text ?? h)}</a>`;
export const txLink = (id, text) =>
  `<a class="tx-link mono" href="#/tx/${esc(id)}">${esc(text ?? short(id))}</a>`;
export const addrLink = (a, text) =>
  a ? `<a class="addr-link mono" href="#/account/${esc(a)}">${esc(text ?? short(a, 8))}</a>` : '–';

/** A two-column table of [label, html] rows. */
export function kv(rows) {
  return `<table class="kv"><tbody>${rows
    .filter((r) => r)
    .map(([k, v]) => `<tr><th>${esc(k)}</th><td>${v}</td></tr>`)
    .join('')}</tbody></table>`;
}

/** A table with a header row; `rows` are arrays of html cells. */
export function table(head, rows, cls = '') {
  if (!rows.length) return '<p class="muted">None.</p>';
  return `<div class="scroll"><table class="list ${cls}"><thead><tr>${head
    .map((h) => `<th>${esc(h)}</th>`)
    .join('')}</tr></thead><tbody>${rows
    .map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join('')}</tr>`)
    .join('')}</tbody></table></div>`;
}
