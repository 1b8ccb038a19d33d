// The explorer's shell: hash routes, the header, search and live updates.
import { api, esc } from './util.js';
import { pages } from './pages.js';

const main = document.getElementById('main');
const headHeight = document.getElementById('head-height');
const chainId = document.getElementById('chain-id');
const liveBadge = document.getElementById('live');

/** The latest live essentials (height, chain id, ...), shared with pages. */
export const live = { status: null };

function setHead(s) {
  if (!s) return;
  live.status = s;
  if (s.chain_id) chainId.textContent = s.chain_id;
  if (s.height !== undefined) headHeight.textContent = String(s.height);
}

let current = null; // AbortController of the page on screen

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const hash = location.hash.replace(/^#\/?/, '');
  const [name, ...rest] = hash.split('/');
  const arg = rest.map(decodeURIComponent).join('/');
  const page = pages[name || 'overview'];
  for (const a of document.querySelectorAll('.nav a')) {
    a.classList.toggle('active', a.getAttribute('href') === `#/${name}` || (!name && a.getAttribute('href') === '#/'));
  }
  if (!page) {
    main.innerHTML = `<h1>Not found</h1><p>No page <code>${esc(hash)}</code>.</p>`;
    return;
  }
  delete main.dataset.renderMs;
  const started = performance.now();
  try {
    await page({ main, arg, signal, live, setHead });
    if (!signal.aborted) main.dataset.renderMs = String(Math.round(performance.now() - started));
  } catch (e) {
    if (signal.aborted) return;
    main.innerHTML = `<h1>Error</h1><p class="error">${esc(e.message)}</p>`;
  }
}

// Search: a height, a block or transaction hash, or an address.
document.getElementById('search').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = document.getElementById('q');
  const q = input.value.trim();
  if (!q) return;
  try {
    const r = await api(`/explorer/search?q=${encodeURIComponent(q)}`);
    if (r.kind === 'none') {
      main.innerHTML = `<h1>Nothing found</h1><p>No block, transaction or account matches <code>${esc(q)}</code>.</p>`;
      return;
    }
    location.hash = `#/${r.kind}/${r.id}`;
  } catch (e) {
    main.innerHTML = `<h1>Search</h1><p class="error">${esc(e.message)}</p>`;
  }
});

// Live updates: block events from /explorer/stream, through a SharedWorker
// where there is one (one stream per browser), else an EventSource.
function onBlock(data) {
  let v;
  try { v = JSON.parse(data); } catch (_) { return; }
  setHead(v);
  window.dispatchEvent(new CustomEvent('blyan:block', { detail: v }));
}

function setLive(on) {
  liveBadge.classList.toggle('off', !on);
  liveBadge.title = on ? 'following new blocks' : 'not connected';
}

function connect() {
  if (typeof SharedWorker === 'function') {
    const w = new SharedWorker('/ui/live-worker.js', { name: 'blyan-live' });
    w.port.onmessage = (m) => {
      const msg = m.data;
      if (msg.type === 'block') { setLive(true); onBlock(msg.data); }
      else if (msg.type === 'open') setLive(true);
      else setLive(false);
    };
    w.port.start();
    window.addEventListener('pagehide', () => w.port.postMessage('bye'));
  } else if (typeof EventSource === 'function') {
    const es = new EventSource('/explorer/stream');
    es.addEventListener('open', () => setLive(true));
    es.addEventListener('block', (e) => { setLive(true); onBlock(e.data); });
    es.addEventListener('error', () => setLive(false));
  }
}

async function start() {
  window.addEventListener('hashchange', route);
  // The first render: chain id and height come with the page and are
  // refreshed by a plain fetch; the stream opens only after it.
  try {
    setHead(await api('/explorer/overview?recent=0'));
  } catch (_) { /* the page shows what the server rendered */ }
  await route();
  connect();
}

start();
