// The explorer's pages. Each renders into `main` and stops following live
// events when `signal` aborts (the user went to another page).
import { api, esc, bly, short, dur, kv, table, blockLink, txLink, addrLink } from './util.js';
import { sparkline, dag } from './charts.js';

const onBlock = (signal, f) =>
  window.addEventListener('blyan:block', (e) => f(e.detail), { signal });

function ago(timeMs) {
  return timeMs ? `${dur(Math.max(0, Date.now() - timeMs))} ago` : '–';
}

function finality(f) {
  if (!f || !f.count) return '–';
  const le = (v) => (v === null || v === undefined ? '> 30 s' : `≤ ${dur(v)}`);
  return `${le(f.p50_le_ms)} / ${le(f.p99_le_ms)}`;
}

// ----- Overview ----------------------------------------------------------------

function charts(recent) {
  const times = recent.map((b, i) => (i ? b.time_ms - recent[i - 1].time_ms : null));
  const tps = recent.map((b, i) => (i && b.time_ms > recent[i - 1].time_ms ? (b.txs * 1000) / (b.time_ms - recent[i - 1].time_ms) : null));
  const fin = recent.map((b) => b.finality_ms ?? null);
  return sparkline(times, { label: 'Block time', unit: ' ms', id: 'chart-block-time' }) +
    sparkline(tps, { label: 'Transactions/s', digits: 1, id: 'chart-tps' }) +
    sparkline(fin, { label: 'Finality (this node\'s clients)', unit: ' ms', id: 'chart-finality' });
}

function blockRows(blocks) {
  return blocks.map((b) => [
    blockLink(b.height),
    `<span class="mono">${esc(short(b.hash))}</span>`,
    esc(ago(b.time_ms)),
    esc(b.txs),
    addrLink(b.proposer),
    esc(b.signers),
  ]);
}
const BLOCK_HEAD = ['Height', 'Hash', 'Time', 'Txs', 'Proposer', 'Signers'];

export async function overview({ main, signal, setHead }) {
  let o = await api('/explorer/overview?recent=60', { signal });
  setHead(o);
  const recent = o.recent;
  const render = () => {
    const last = recent[recent.length - 1];
    main.innerHTML = `
      <h1>Overview</h1>
      <section class="cards">
        <div class="card"><span>Chain</span><b id="ov-chain">${esc(o.chain_id)}</b></div>
        <div class="card"><span>Height</span><b id="ov-height">${esc(o.height)}</b></div>
        <div class="card"><span>Since last block</span><b id="ov-since" data-time="${esc(last ? last.time_ms : '')}">${esc(last ? dur(Date.now() - last.time_ms) : '–')}</b></div>
        <div class="card"><span>Finality p50 / p99</span><b id="ov-finality">${esc(finality(o.finality))}</b></div>
        <div class="card"><span>Transactions/s</span><b id="ov-tps">${o.tx_per_s === null || o.tx_per_s === undefined ? '–' : esc(o.tx_per_s.toFixed(2))}</b></div>
        <div class="card"><span>Mempool</span><b id="ov-mempool">${esc(o.mempool_txs)}</b></div>
        <div class="card"><span>Validators online</span><b id="ov-validators">${esc(o.validators.online)} / ${esc(o.validators.active)}</b></div>
      </section>
      <section class="charts">${charts(recent)}</section>
      <h2>Latest blocks</h2>
      <div id="ov-blocks">${table(BLOCK_HEAD, blockRows(recent.slice(-10).reverse()))}</div>
      <p><a href="#/blocks">All blocks →</a></p>`;
  };
  render();
  const tick = setInterval(() => {
    const el = document.getElementById('ov-since');
    if (el && el.dataset.time) el.textContent = dur(Date.now() - Number(el.dataset.time));
  }, 1000);
  signal.addEventListener('abort', () => clearInterval(tick));
  onBlock(signal, (v) => {
    if (!v.block || (recent.length && v.block.height <= recent[recent.length - 1].height)) return;
    recent.push(v.block);
    while (recent.length > 60) recent.shift();
    const first = recent[0], last = recent[recent.length - 1];
    const txs = recent.slice(1).reduce((a, b) => a + b.txs, 0);
    o = { ...o, ...v, tx_per_s: last.time_ms > first.time_ms ? (txs * 1000) / (last.time_ms - first.time_ms) : null };
    render();
  });
}

// ----- Blocks --------------------------------------------------------------------

export async function blocks({ main, arg, signal }) {
  const before = /^\d+$/.test(arg) ? Number(arg) : null;
  const r = await api(`/explorer/blocks?limit=25${before ? `&before=${before}` : ''}`, { signal });
  const list = r.blocks;
  const render = () => {
    main.innerHTML = `
      <h1>Blocks</h1>
      <div id="block-list">${table(BLOCK_HEAD, blockRows(list))}</div>
      <p class="pager">${before ? '<a href="#/blocks">Newest</a>' : '<span class="muted">following new blocks</span>'}
      ${r.next_before ? ` · <a href="#/blocks/${esc(r.next_before)}">Older →</a>` : ''}</p>`;
  };
  render();
  if (!before) {
    onBlock(signal, (v) => {
      if (!v.block || (list.length && v.block.height <= list[0].height)) return;
      list.unshift(v.block);
      if (list.length > 25) list.pop();
      render();
    });
  }
}

export async function block({ main, arg, signal }) {
  const [id, off] = arg.split('/');
  const offset = /^\d+$/.test(off || '') ? Number(off) : 0;
  const b = await api(`/explorer/block/${encodeURIComponent(id)}?offset=${offset}&limit=50`, { signal });
  const txRows = b.tx_page.map((t) => [
    txLink(t.id),
    addrLink(t.sender),
    esc(t.kind) + (t.to ? ` → ${addrLink(t.to)}` : ''),
    t.amount ? `${esc(bly(t.amount))} BLY` : '',
    t.fee_paid ? esc(bly(t.fee_paid, 9)) : '–',
    t.success === false ? '<span class="bad">failed</span>' : '<span class="good">ok</span>',
  ]);
  const more = b.txs_total > offset + b.tx_page.length;
  main.innerHTML = `
    <h1>Block ${esc(b.height)}</h1>
    ${kv([
      ['Hash', `<span id="block-hash" class="mono wrap">${esc(b.hash)}</span>`],
      ['Height', `<span id="block-height">${esc(b.height)}</span>`],
      ['Parent', b.height > 1 ? `${blockLink(b.height - 1, short(b.prev_hash))}` : `<span class="mono">${esc(short(b.prev_hash))}</span>`],
      ['Time', `${esc(new Date(b.time_ms).toISOString())} (${esc(ago(b.time_ms))})`],
      ['Proposer', addrLink(b.proposer, b.proposer)],
      ['Transactions', esc(b.txs_total)],
      ['Gas used / limit', `${esc(b.gas_used)} / ${esc(b.gas_limit)}`],
      ['Base fee', `${esc(b.base_fee_per_gas)} base units/gas`],
      ['State root', `<span class="mono wrap">${esc(b.state_root)}</span>`],
      ['Receipts hash', `<span class="mono wrap">${esc(b.receipts_hash)}</span>`],
      ['Certificate', `round ${esc(b.certificate.round)}, ${esc(b.certificate.signers.length)} signers`],
    ])}
    <h2>Certificate signers</h2>
    <p class="addrs">${b.certificate.signers.map((s) => addrLink(s, s)).join('<br>') || '<span class="muted">None.</span>'}</p>
    <h2>Parent's commit signers (in this block)</h2>
    <p class="addrs">${b.last_commit_signers.map((s) => addrLink(s, s)).join('<br>') || '<span class="muted">None.</span>'}</p>
    <h2>Evidence</h2>
    ${table(['Kind', 'Validator', 'Height', 'Round'], b.evidence.map((e) => [esc(e.kind), addrLink(e.validator), esc(e.height), esc(e.round)]))}
    <h2>Transactions</h2>
    <div id="block-txs">${table(['Id', 'Sender', 'Kind', 'Amount', 'Fee (BLY)', 'Result'], txRows)}</div>
    <p class="pager">
      ${offset > 0 ? `<a href="#/block/${esc(b.height)}/${Math.max(0, offset - 50)}">← Previous</a>` : ''}
      ${more ? ` <a href="#/block/${esc(b.height)}/${offset + 50}">Next →</a>` : ''}
      · ${blockLink(b.height + 1, 'Next block →')}
    </p>`;
}

// ----- Transactions and accounts -------------------------------------------------

export async function tx({ main, arg, signal }) {
  const t = await api(`/explorer/tx/${encodeURIComponent(arg)}`, { signal });
  const detail = [];
  if (t.to) detail.push(['To', addrLink(t.to, t.to)]);
  if (t.amount) detail.push(['Amount', `<span id="tx-amount">${esc(bly(t.amount))}</span> BLY`]);
  if (t.op) detail.push(['Operation', `${esc(t.op)} <span class="mono">${esc(short(t.subject))}</span>`]);
  if (t.endpoint) detail.push(['Endpoint', esc(t.endpoint)]);
  if (t.bond) detail.push(['Bond', `${esc(bly(t.bond))} BLY`]);
  main.innerHTML = `
    <h1>Transaction</h1>
    ${kv([
      ['Id', `<span id="tx-id" class="mono wrap">${esc(t.id)}</span>`],
      ['Status', `${esc(t.status)}, ${t.success ? '<span class="good">succeeded</span>' : `<span class="bad">failed: ${esc(t.failure)}</span>`}`],
      ['Block', `${blockLink(t.height)} (index ${esc(t.index)}, ${esc(new Date(t.time_ms).toISOString())})`],
      ['Sender', addrLink(t.sender, t.sender)],
      ['Kind', esc(t.kind)],
      ...detail,
      ['Nonce', esc(t.nonce)],
      ['Gas used / limit', `${esc(t.gas_used)} / ${esc(t.gas_limit)}`],
      ['Fee paid', `<span id="tx-fee">${esc(bly(t.fee_paid, 12))}</span> BLY`],
      ['Base fee burned', `${esc(bly(t.base_fee_burned, 12))} BLY (${esc(t.gas_used)} gas × ${esc(t.base_fee_per_gas)})`],
      ['Tip to proposer', `${esc(bly(t.tip, 12))} BLY`],
      ['Max fee / priority per gas', `${esc(t.max_fee_per_gas)} / ${esc(t.max_priority_fee_per_gas)}`],
    ])}
    <h2>Events</h2>
    ${t.events.length ? table(['Kind', 'Detail'], t.events.map((e) => [esc(e.kind), esc(e.reason ?? '')]))
      : '<p class="muted">None. (The node keeps receipts; block events such as slashing or reward mints are not stored.)</p>'}`;
}

export async function account({ main, arg, signal }) {
  const a = await api(`/explorer/account/${encodeURIComponent(arg)}`, { signal });
  const v = a.validator;
  main.innerHTML = `
    <h1>Account</h1>
    ${kv([
      ['Address', `<span id="account-address" class="mono wrap">${esc(a.address)}</span>`],
      ['Balance', `<b id="account-balance">${esc(bly(a.balance, 18))}</b> BLY <span class="muted small">(${esc(a.balance)} base units)</span>`],
      ['Nonce', `<span id="account-nonce">${esc(a.nonce)}</span>`],
      ['Stake', `${esc(bly(a.stake))} BLY`],
      v && ['Validator', `${v.tombstoned ? '<span class="bad">tombstoned</span>' : v.jailed_until && v.jailed_until > a.height ? `<span class="bad">jailed until ${esc(v.jailed_until)}</span>` : '<span class="good">bonded</span>'}`],
      a.node && ['GPU node', `${esc(a.node.endpoint)}, ${esc(a.node.blocks.length)} blocks, bond ${esc(bly(a.node.bond))} BLY, since ${blockLink(a.node.registered_at)}`],
      ['At height', esc(a.height)],
    ])}
    <h2>Unbonding</h2>
    ${table(['Amount (BLY)', 'Created', 'Released at', 'Node bond'], a.unbonding.map((u) => [esc(bly(u.amount)), blockLink(u.creation_height), esc(u.release_height), u.node_bond ? 'yes' : 'no']))}
    <h2>Recent transactions</h2>
    <div id="account-txs">${table(['Id', 'Block'], a.recent_txs.map((t) => [txLink(t.id), blockLink(t.height)]))}</div>
    <p class="muted small">Indexed by this node from height ${esc(a.recent_txs_indexed_from ?? '–')} (the last 25 per address).</p>`;
}

// ----- Validators, nodes, rewards --------------------------------------------------

export async function validators({ main, arg, signal }) {
  const after = arg ? `&after=${encodeURIComponent(arg)}` : '';
  const r = await api(`/explorer/validators?limit=100${after}`, { signal });
  const rows = r.validators.map((v) => [
    addrLink(v.address),
    esc(v.power ?? '–'),
    esc(bly(v.bonded)),
    v.tombstoned ? '<span class="bad">tombstoned</span>' : v.jailed ? `<span class="bad">jailed until ${esc(v.jailed_until)}</span>` : v.active ? '<span class="good">active</span>' : 'inactive',
    `${esc(v.missed_blocks)} / ${esc(v.window_blocks)}`,
    v.signed_last_commit ? '✓' : '–',
    v.address === r.last_proposer ? 'last proposer' : '',
  ]);
  main.innerHTML = `
    <h1>Validators</h1>
    <p>${esc(r.active)} active, total power ${esc(r.total_power)}; missed blocks counted over the last ${esc(r.signed_blocks_window)} blocks (SLASH-2).</p>
    <div id="validators">${table(['Address', 'Power', 'Bonded (BLY)', 'Status', 'Missed / window', 'Signed last', ''], rows)}</div>
    ${r.next_after ? `<p class="pager"><a href="#/validators/${esc(r.next_after)}">Next →</a></p>` : ''}
    <h2>Proposer committee</h2>
    ${r.committee ? `<p>Epoch <span id="committee-epoch">${esc(r.committee.epoch)}</span> (${esc(r.committee.epoch_length_blocks)} blocks per epoch), seed <code>${esc(r.committee.seed)}</code></p>
    <p>Members (drawing order): ${r.committee.members.map(a => `<a href="#/account/${esc(a)}">${esc(a)}</a>`).join(', ') || 'none (every active validator proposes)'}</p>` : '<p class="muted">No committee.</p>'}`;
}

const ROUTES_KEY = 'blyan.routes';

function recentRoutes() {
  try { return JSON.parse(sessionStorage.getItem(ROUTES_KEY) || '[]'); } catch (_) { return []; }
}

export async function nodes({ main, arg, signal }) {
  const after = arg ? `&after=${encodeURIComponent(arg)}` : '';
  const r = await api(`/nodes?limit=50${after}`, { signal });
  const now = Date.now();
  const chain = r.on_chain.map((n) => [addrLink(n.node_id), esc(n.endpoint), esc(n.blocks.length), esc(bly(n.bond)), blockLink(n.registered_at)]);
  // RT-HB-12: inference nodes whose heartbeats this node holds.
  const live = (r.live || []).map((n) => [
    addrLink(n.node_id),
    n.holdings.length ? n.holdings.map((h) => `${esc(short(h.model))} layers ${esc(h.layers[0])}–${esc(h.layers[1])}${h.experts.length ? `, ${esc(h.experts.length)} experts` : ''}`).join('<br>') : '<span class="muted">nothing</span>',
    esc(dur(n.last_heartbeat_age_ms)),
    n.latency_ms == null ? '–' : esc(`${n.latency_ms.toFixed(2)} ms`),
    n.delivery_success_rate == null ? '–' : esc(`${(100 * n.delivery_success_rate).toFixed(1)} %`),
    esc(`${n.load.queue_depth} queued, ${n.load.free_slots} free`),
    n.quarantined ? '<span class="bad">quarantined</span>' : '<span class="good">ok</span>',
  ]);
  const ann = r.announced.map((n) => [addrLink(n.node_id), esc(`${n.host}:${n.port}`), esc(n.available_experts.length), esc(dur(now - n.announced_at_ms))]);
  const routes = recentRoutes();
  main.innerHTML = `
    <h1>Nodes</h1>
    <h2>Live inference nodes</h2>
    ${live.length ? table(['Node', 'Holdings', 'Last heartbeat', 'Latency from here', 'Delivered', 'Load', 'Health'], live)
      : '<p class="muted">No inference node has sent this node a heartbeat in the last three intervals.</p>'}
    <h2>Registered on chain</h2>
    ${table(['Node', 'Endpoint', 'Blocks held', 'Bond (BLY)', 'Since'], chain)}
    <h2>Announced to this node</h2>
    ${table(['Node', 'Endpoint', 'Experts', 'Announced'], ann)}
    ${r.next_after ? `<p class="pager"><a href="#/nodes/${esc(r.next_after)}">Next →</a></p>` : ''}
    <h2>Routes of recent answers</h2>
    ${routes.length ? table(['When', 'Tokens', 'Route'], routes.map((x) => [esc(new Date(x.at).toLocaleTimeString()), esc(x.tokens ?? '–'),
      x.route && x.route.length ? x.route.map((s) => `${addrLink(s.node)} (${esc(s.work)})`).join(', ') : '<span class="muted">this node</span>']))
      : '<p class="muted">No answers yet in this browser session; ask on the <a href="#/chat">Chat</a> page.</p>'}`;
}

export async function rewards({ main, signal }) {
  const r = await api('/explorer/rewards', { signal });
  const rows = r.pools.map((p) => [esc(p.pool), esc(bly(p.budget)), esc(bly(p.claimed)), esc(p.claimants), p.weighted ? 'by weight' : 'by amount']);
  main.innerHTML = `
    <h1>Rewards</h1>
    ${kv([
      ['Epoch', `<span id="rewards-epoch">${esc(r.epoch)}</span> (blocks ${esc(r.epoch_start_height)}–${esc(r.next_settlement_height - 1)}, ${esc(r.epoch_length_blocks)} per epoch)`],
      ['Settles at height', esc(r.next_settlement_height)],
      ['Epoch budget', `${esc(bly(r.epoch_budget))} BLY (${esc(bly(r.emission_per_block))} per block)`],
      ['Minted so far', `${esc(bly(r.minted_total))} BLY`],
      ['Burned so far', `${esc(bly(r.burned_total))} BLY`],
      ['Slashed so far', `${esc(bly(r.slashed_total))} BLY`],
    ])}
    <h2>Pools of epoch ${esc(r.epoch)}</h2>
    ${table(['Pool', 'Budget (BLY)', 'Claimed', 'Claimants', 'Paid'], rows)}
    <p class="muted small">Claims are weights for the signing and attestation pools and BLY for the others. Earlier epochs' payouts were minted at their boundaries (block events, not kept by the node).</p>`;
}

// ----- PoL ------------------------------------------------------------------------

export async function pol({ main, signal }) {
  const blocks = [];
  let after = '';
  let total = 0;
  for (let page = 0; page < 5; page++) {
    const r = await api(`/pol/blocks?limit=100${after}`, { signal });
    total = r.total;
    blocks.push(...r.blocks);
    if (r.blocks.length < 100) break;
    after = `&after=${r.blocks[r.blocks.length - 1].id}`;
  }
  const p = await api('/explorer/pol?limit=100', { signal });
  const heads = new Set(p.targets.map((t) => t.head));
  const targets = p.targets.map((t) => [
    esc(t.kind) + (t.layer !== null ? ` ${esc(t.layer)}` : '') + (t.expert !== null ? `.${esc(t.expert)}` : ''),
    `<span class="mono">${esc(short(t.head))}</span>`,
    esc(`v${t.version.major}.${t.version.minor}.${t.version.patch}`),
    esc(t.accepted_deltas),
    esc(t.loss_micronats ?? '–'),
    esc(t.usage_count),
  ]);
  const deltas = p.pending_deltas.map((d) => [
    `<span class="mono">${esc(short(d.delta_id))}</span>`, addrLink(d.submitter), esc(d.status),
    `${esc(d.attestations)} (${esc(d.attestations_revealed)} revealed)`, esc(d.reveal_end_height),
  ]);
  main.innerHTML = `
    <h1>Proof of Learning</h1>
    <p>${esc(total)} blocks in the DAG${blocks.length < total ? ` (the first ${esc(blocks.length)} drawn)` : ''}: meta → layers, experts and routers → deltas; heads outlined.</p>
    <div class="scroll dag-wrap">${dag(blocks, heads)}</div>
    <h2>Targets and heads</h2>
    ${table(['Target', 'Head', 'Version', 'Accepted deltas', 'Loss (µnat)', 'Uses'], targets)}
    <h2>Pending deltas</h2>
    ${table(['Delta', 'Submitter', 'Status', 'Attestations', 'Decided at'], deltas)}`;
}

// ----- Chat -----------------------------------------------------------------------

const KEY_STORE = 'blyan.apiKey';
const history = [];

function rememberRoute(entry) {
  const list = recentRoutes();
  list.unshift(entry);
  sessionStorage.setItem(ROUTES_KEY, JSON.stringify(list.slice(0, 20)));
}

export async function chat({ main, signal }) {
  main.innerHTML = `
    <h1>Chat</h1>
    <form id="chat-form" class="chat-form">
      <label>API key <input id="chat-key" type="password" autocomplete="off" placeholder="optional on a devnet (free inference)"></label>
      <label>Max tokens <input id="chat-max" type="number" min="1" max="512" value="32"></label>
      <textarea id="chat-prompt" rows="3" placeholder="Ask the network…" required></textarea>
      <button id="chat-send" type="submit">Send</button>
    </form>
    <div id="chat-log" class="chat-log" aria-live="polite"></div>`;
  const key = document.getElementById('chat-key');
  key.value = sessionStorage.getItem(KEY_STORE) || '';
  const log = document.getElementById('chat-log');
  for (const m of history) {
    log.insertAdjacentHTML('beforeend', `<div class="msg ${esc(m.role)}"><span class="who">${esc(m.role)}</span><div class="text">${esc(m.content)}</div></div>`);
  }
  document.getElementById('chat-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const prompt = document.getElementById('chat-prompt');
    const text = prompt.value.trim();
    if (!text) return;
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    prompt.value = '';
    history.push({ role: 'user', content: text });
    log.insertAdjacentHTML('beforeend', `<div class="msg user"><span class="who">you</span><div class="text">${esc(text)}</div></div>`);
    const box = document.createElement('div');
    box.className = 'msg assistant streaming';
    box.innerHTML = '<span class="who">assistant</span><div class="text chat-answer"></div><div class="meta chat-meta">streaming…</div>';
    log.appendChild(box);
    const out = box.querySelector('.text');
    const meta = box.querySelector('.meta');
    const send = document.getElementById('chat-send');
    send.disabled = true;
    const headers = { 'content-type': 'application/json', accept: 'text/event-stream' };
    if (key.value.trim()) headers.authorization = `Bearer ${key.value.trim()}`;
    const maxTokens = Math.max(1, Math.min(512, Number(document.getElementById('chat-max').value) || 32));
    let answer = '', usage = null, blyan = null, failure = null;
    const started = performance.now();
    try {
      const r = await fetch('/v1/chat/completions', {
        method: 'POST', headers, signal,
        body: JSON.stringify({ messages: history.slice(-6), max_tokens: maxTokens, stream: true, stream_options: { include_usage: true } }),
      });
      if (!r.ok) {
        let body = null;
        try { body = await r.json(); } catch (_) { /* not JSON */ }
        throw new Error(body && body.message ? body.message : `HTTP ${r.status}`);
      }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      let event = 'message';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, '');
          buf = buf.slice(nl + 1);
          if (line.startsWith('event:')) { event = line.slice(6).trim(); continue; }
          if (!line.startsWith('data:')) { if (!line) event = 'message'; continue; }
          const data = line.slice(5).trim();
          if (data === '[DONE]') continue;
          let c;
          try { c = JSON.parse(data); } catch (_) { continue; }
          if (event === 'error' || c.error) { failure = (c.error && c.error.message) || 'error'; continue; }
          const delta = c.choices && c.choices[0] && c.choices[0].delta;
          if (delta && delta.content) { answer += delta.content; out.textContent = answer; }
          if (c.usage) usage = c.usage;
          if (c.blyan) blyan = c.blyan;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      failure = e.message;
    } finally {
      send.disabled = false;
      box.classList.remove('streaming');
    }
    const ms = performance.now() - started;
    history.push({ role: 'assistant', content: answer });
    const parts = [];
    if (failure) parts.push(`<span class="bad">${esc(failure)}</span>`);
    if (usage) parts.push(`<span class="chat-tokens">${esc(usage.total_tokens)} tokens</span> (${esc(usage.prompt_tokens)} prompt + ${esc(usage.completion_tokens)} completion)`);
    if (blyan) {
      // API-CHAT-2: free (keyless) use is reported, not charged.
      const charged = blyan.charged ? 'charged to your allowance' : 'not charged (free use)';
      parts.push(`cost <b class="chat-cost">${esc(bly(blyan.cost_base_units, 18))} BLY</b> <span class="muted">${charged}</span>`);
      const route = blyan.route || [];
      parts.push(`route <span class="chat-route">${route.length ? route.map((s) => `${addrLink(s.node)} (${esc(s.work)})`).join(' → ') : 'this node'}</span>`);
    } else if (usage) {
      parts.push('<span class="muted">cost not reported by this node</span>');
    }
    parts.push(`<span class="muted">${esc(dur(ms))}</span>`);
    meta.innerHTML = parts.join(' · ');
    rememberRoute({ at: Date.now(), tokens: usage && usage.total_tokens, route: blyan ? blyan.route : [] });
  }, { signal });
}

export const pages = { overview, blocks, block, tx, account, validators, nodes, rewards, pol, chat };
