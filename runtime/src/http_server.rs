//! The HTTP API's server: a hand-rolled accept loop over hyper's HTTP/1
//! connection (instead of `axum::serve`, which has no timeouts and no
//! connection limits), with the limits below ([`HttpConfig`], `[http]` in
//! the node's TOML).
//!
//! - **API-HTTP-1** A connection must deliver a complete request head within
//!   `header_read_timeout_ms` of the server waiting for one (a new
//!   connection, or an idle keep-alive one); otherwise it is closed without
//!   an answer (slow-loris clients, idle sockets).
//! - **API-HTTP-2** A request must be answered, up to its response head,
//!   within `request_timeout_ms`: reading the body and running the handler.
//!   Past it the answer is `408`/5001 `request_timeout` and the connection
//!   is closed. A streamed body (`/v1/chat/completions` with `stream: true`)
//!   is not cut: its head is sent at once and the stream has its own bounds
//!   (API-CHAT-4). Handlers' own timeouts are shorter (inference 30 s,
//!   `POST /tx` 10 s), so `request_timeout_ms` must exceed the inference
//!   timeout (checked when the configuration is read).
//! - **API-HTTP-3** At most `max_connections` connections are open at once,
//!   and at most `max_connections_per_ip` from one client address. A
//!   connection over either cap is closed at accept, before anything is
//!   read from it, and counted in `/metrics`
//!   (`blyan_http_connections_refused_total{reason}`). The global cap is
//!   also held to half the process's file-descriptor limit.
//! - **API-HTTP-4** At start-up the process raises its `RLIMIT_NOFILE` soft
//!   limit to the hard limit ([`raise_nofile_limit`], once per process),
//!   through `rustix` (already in the dependency tree via `tempfile`; the
//!   workspace forbids `unsafe`, so no direct `libc` call).
//! - **API-HTTP-5** `send_buffer_bytes`, when set, fixes each connection's
//!   kernel send buffer (`SO_SNDBUF`; unset, Linux autotunes it up to
//!   `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default). It bounds the kernel
//!   memory a client that stops reading pins, and how far a stream runs
//!   ahead of its reader before the engine finds the reader stalled
//!   (API-CHAT-4).
//!
//! Every accepted connection gets `TCP_NODELAY` (without it a keep-alive
//! client waits on Nagle's algorithm and delayed ACKs, tens of ms per
//! request), and the client address as `ConnectInfo<SocketAddr>` for the
//! rate limits. On shutdown the loop stops accepting and every connection
//! finishes its request in flight, then closes.

use crate::api::{ApiError, code};
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument as _;

/// The HTTP server's limits (`[http]` in the node's TOML).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// API-HTTP-1: time to receive a request head, from when the server
    /// starts waiting for one (also the keep-alive idle limit).
    pub header_read_timeout_ms: u64,
    /// API-HTTP-2: time to read the body and produce the response head.
    pub request_timeout_ms: u64,
    /// API-HTTP-3: open connections, all clients together.
    pub max_connections: usize,
    /// API-HTTP-3: open connections from one client IP address. `blyan
    /// bench` opens up to 256 keep-alive connections per node from one
    /// address.
    pub max_connections_per_ip: usize,
    /// API-HTTP-5: `SO_SNDBUF` of each connection; `None`: the kernel's
    /// autotuning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_buffer_bytes: Option<usize>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 60_000,
            max_connections: 4_096,
            max_connections_per_ip: 512,
            send_buffer_bytes: None,
        }
    }
}

impl HttpConfig {
    /// Positive values, and (with `inference_timeout_ms`) a request timeout
    /// that leaves `/chat` its own timeout (API-HTTP-2).
    pub fn check(&self, inference_timeout_ms: Option<u64>) -> Result<(), crate::Error> {
        if self.header_read_timeout_ms == 0
            || self.request_timeout_ms == 0
            || self.max_connections == 0
            || self.max_connections_per_ip == 0
            || self.send_buffer_bytes == Some(0)
        {
            return Err(crate::Error::Config(
                "http.header_read_timeout_ms, request_timeout_ms, max_connections, max_connections_per_ip and send_buffer_bytes must be positive".into(),
            ));
        }
        if let Some(t) = inference_timeout_ms
            && self.request_timeout_ms <= t
        {
            return Err(crate::Error::Config(format!(
                "http.request_timeout_ms ({}) must exceed inference.timeout_ms ({t})",
                self.request_timeout_ms
            )));
        }
        Ok(())
    }
}

/// The server's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    open: AtomicU64,
    accepted: AtomicU64,
    refused_per_ip: AtomicU64,
    refused_global: AtomicU64,
    header_timeouts: AtomicU64,
    request_timeouts: AtomicU64,
}

impl HttpStats {
    /// Open connections now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition of the counters.
    pub fn metrics_text(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = String::new();
        let mut one = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "blyan_http_connections_open",
            "Open HTTP API connections.",
            "gauge",
            get(&self.open),
        );
        one(
            "blyan_http_connections_accepted_total",
            "HTTP API connections accepted within the caps (API-HTTP-3).",
            "counter",
            get(&self.accepted),
        );
        one(
            "blyan_http_header_timeouts_total",
            "HTTP API connections closed for not sending a request head in time (API-HTTP-1).",
            "counter",
            get(&self.header_timeouts),
        );
        one(
            "blyan_http_request_timeouts_total",
            "HTTP API requests answered 408 for not completing in time (API-HTTP-2).",
            "counter",
            get(&self.request_timeouts),
        );
        let name = "blyan_http_connections_refused_total";
        let _ = writeln!(
            s,
            "# HELP {name} HTTP API connections closed at accept: over the per-address or the global cap (API-HTTP-3).\n# TYPE {name} counter"
        );
        for (reason, v) in [
            ("per_ip", get(&self.refused_per_ip)),
            ("global", get(&self.refused_global)),
        ] {
            let _ = writeln!(s, "{name}{{reason=\"{reason}\"}} {v}");
        }
        s
    }
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    PerIp,
    Global,
}

/// API-HTTP-3: counts open connections, all together and per address. The
/// per-address table holds only addresses with an open connection, so it
/// is bounded by the global cap.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; its slot is released when dropped.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a connection from `ip`, or why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *guard;
        if *total >= self.max_total {
            return Err(Refused::Global);
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        *total += 1;
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }

    /// Open connections, all together.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_ip) = &mut *guard;
        *total -= 1;
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// API-HTTP-4: raises the `RLIMIT_NOFILE` soft limit to the hard limit,
/// once per process; returns the soft limit in force (`None` if unknown or
/// unlimited).
pub fn raise_nofile_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(raise_nofile_limit_now)
}

#[cfg(unix)]
fn raise_nofile_limit_now() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    // An unlimited hard limit is refused by Linux above `nr_open`, whose
    // default is 2^20.
    let target = before.maximum.unwrap_or(1 << 20);
    if before.current.is_some_and(|c| c >= target) || before.current.is_none() {
        return before.current;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: before.maximum,
        },
    ) {
        Ok(()) => {
            tracing::info!(from = ?before.current, to = target, "raised RLIMIT_NOFILE");
            Some(target)
        }
        Err(e) => {
            tracing::warn!(error = %e, soft = ?before.current, "could not raise RLIMIT_NOFILE");
            before.current
        }
    }
}

#[cfg(not(unix))]
fn raise_nofile_limit_now() -> Option<u64> {
    None
}

/// API-HTTP-2: the middleware that bounds producing a response head.
pub async fn request_timeout(
    State((timeout, stats)): State<(Duration, Arc<HttpStats>)>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            stats.request_timeouts.fetch_add(1, Ordering::Relaxed);
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                code::VALIDATION_FAILED,
                "request_timeout",
                format!(
                    "the request was not received and answered within {} ms",
                    timeout.as_millis()
                ),
            )
            .into_response();
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

/// Serves `router` on `listener` under `config` until `shutdown` turns
/// true (or its sender is dropped). `router` should carry
/// [`request_timeout`] (see [`with_limits`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: HttpConfig,
    stats: Arc<HttpStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let fd_cap = raise_nofile_limit().map_or(usize::MAX, |n| (n / 2) as usize);
    let max_total = config.max_connections.min(fd_cap.max(1));
    if max_total < config.max_connections {
        tracing::warn!(
            max_connections = config.max_connections,
            held_to = max_total,
            "http.max_connections held to half the file-descriptor limit"
        );
    }
    let limits = ConnectionLimits::new(max_total, config.max_connections_per_ip);
    let header_timeout = Duration::from_millis(config.header_read_timeout_ms);
    // Dropped by each connection task when it ends; `closed()` then waits
    // for all of them.
    let (done_tx, done_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stopped(&mut shutdown) => break,
        };
        let (tcp, remote) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match limits.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                let c = match why {
                    Refused::PerIp => &stats.refused_per_ip,
                    Refused::Global => &stats.refused_global,
                };
                c.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, ?why, "HTTP connection refused");
                drop(tcp);
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an API connection");
        }
        if let Some(n) = config.send_buffer_bytes
            && let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(n)
        {
            tracing::debug!(error = %e, "could not set SO_SNDBUF on an API connection");
        }
        let router = router.clone();
        let stats = stats.clone();
        let mut shutdown = shutdown.clone();
        let done = done_rx.clone();
        tokio::spawn(
            async move {
                stats.open.fetch_add(1, Ordering::Relaxed);
                let service =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(remote));
                        tower::ServiceExt::oneshot(router.clone(), req)
                    });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout);
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                tokio::pin!(conn);
                let mut draining = false;
                loop {
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                if e.is_timeout() {
                                    stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                                }
                                tracing::trace!(error = %e, %remote, "HTTP connection ended");
                            }
                            break;
                        }
                        () = stopped(&mut shutdown), if !draining => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
                stats.open.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
                drop(done);
            }
            .in_current_span(),
        );
    }
    drop(listener);
    drop(done_rx);
    done_tx.closed().await;
}

/// Resolves once `shutdown` is true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// `router` with the request timeout (API-HTTP-2) and the server's
/// counters as an extension (for `/metrics`).
pub fn with_limits(router: Router, config: &HttpConfig, stats: Arc<HttpStats>) -> Router {
    let timeout = Duration::from_millis(config.request_timeout_ms);
    router
        .layer(axum::middleware::from_fn_with_state(
            (timeout, stats.clone()),
            request_timeout,
        ))
        .layer(axum::Extension(stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// API-HTTP-3: the caps, per address and in all, and slots released on drop.
    #[test]
    fn api_http_3_connection_caps() {
        let limits = ConnectionLimits::new(3, 2);
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        let c = IpAddr::from([10, 0, 0, 3]);
        let a1 = limits.admit(a).unwrap();
        let a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::PerIp);
        let b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(c).unwrap_err(), Refused::Global);
        assert_eq!(limits.open(), 3);
        drop(a1);
        let c1 = limits.admit(c).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::Global);
        drop((a2, b1, c1));
        assert_eq!(limits.open(), 0);
        assert!(
            limits.open.lock().unwrap().1.is_empty(),
            "no empty entries kept"
        );
        let _again = limits.admit(a).unwrap();
        let _again2 = limits.admit(a).unwrap();
    }

    /// API-HTTP-2: the request timeout must leave inference its own.
    #[test]
    fn api_http_2_request_timeout_exceeds_the_inference_timeout() {
        let c = HttpConfig::default();
        assert!(c.check(Some(30_000)).is_ok());
        assert!(c.check(Some(60_000)).is_err());
        assert!(c.check(None).is_ok());
        let zero = HttpConfig {
            max_connections_per_ip: 0,
            ..HttpConfig::default()
        };
        assert!(zero.check(None).is_err());
    }

    /// API-HTTP-4: after start-up the soft limit is the hard limit.
    #[cfg(unix)]
    #[test]
    fn api_http_4_nofile_soft_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit};
        let got = raise_nofile_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(got, now.current);
        match now.maximum {
            Some(hard) => assert_eq!(now.current, Some(hard)),
            None => assert!(now.current.is_none_or(|c| c >= 1 << 20)),
        }
    }
}
