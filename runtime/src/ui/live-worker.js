// One block stream per browser, shared by every explorer tab (API-UI-4).
// A SharedWorker also keeps the stream out of the page's own network
// activity, so a headless renderer's virtual time is not held by it.
const ports = new Set();
let source = null;

function broadcast(msg) {
  for (const p of ports) p.postMessage(msg);
}

function open() {
  if (source) return;
  source = new EventSource('/explorer/stream');
  source.addEventListener('open', () => broadcast({ type: 'open' }));
  source.addEventListener('block', (e) => broadcast({ type: 'block', data: e.data }));
  source.addEventListener('lagged', () => broadcast({ type: 'lagged' }));
  source.addEventListener('error', () => broadcast({ type: 'error' }));
}

onconnect = (e) => {
  const port = e.ports[0];
  ports.add(port);
  port.onmessage = (m) => {
    if (m.data === 'bye') {
      ports.delete(port);
      if (!ports.size && source) { source.close(); source = null; }
    }
  };
  port.start();
  open();
};
