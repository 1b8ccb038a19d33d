//! The HTTP API under hostile or unlucky clients (issue 18, items 3–5), on a
//! real one-validator devnet on loopback with the embedded model:
//!
//! - API-CHAT-4: a stream reader that stops reading, or a client that
//!   disconnects, never holds the inference engine;
//! - API-CHAT-5: a panic in the engine is one `500`, then the engine is
//!   rebuilt; `/health` and `/metrics` report it;
//! - API-HTTP-*: slow-loris connections are closed after the header
//!   timeout, connections over the per-address cap are closed at once, and
//!   a normal client is served meanwhile.
//!
//! Waiting is by polling against a generous deadline, never a timed assertion.

mod support;

use blyan_runtime::client::{get_json, post_json, send};
use blyan_runtime::devnet::{Devnet, DevnetOptions};
use blyan_runtime::http_server::HttpConfig;
use blyan_runtime::inference::InferenceConfig;
use blyan_runtime::ratelimit::RateLimitConfig;
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use support::{DEADLINE, eventually, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The tests of this file run one at a time: one of them counts the
/// process's open file descriptors.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn devnet(dir: &std::path::Path, inference: InferenceConfig) -> Devnet {
    devnet_with(dir, inference, HttpConfig::default()).await
}

async fn devnet_with(
    dir: &std::path::Path,
    inference: InferenceConfig,
    http: HttpConfig,
) -> Devnet {
    let mut opts = DevnetOptions::new(dir.join("devnet"), 1);
    opts.base_port = None;
    opts.block_interval_ms = 300;
    opts.rate_limits = RateLimitConfig::unlimited();
    opts.inference = inference;
    opts.http = http;
    Devnet::start(opts).await.unwrap()
}

/// An engine whose jobs end only when a test makes them end early.
fn long_jobs() -> InferenceConfig {
    InferenceConfig {
        timeout_ms: 600_000,
        max_tokens_limit: 4_000,
        ..InferenceConfig::default()
    }
}

/// `f`, or a panic naming `what` after [`DEADLINE`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"))
}

/// The value of the sample `name` (with its labels) in `/metrics`.
async fn metric(url: &str, name: &str) -> Option<u64> {
    let r = within("/metrics", send(url, "GET", "/metrics", &[], None))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    metric_value(&String::from_utf8(r.body).unwrap(), name)
}

fn host(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// A raw HTTP/1.1 POST of `body` on `stream`, written by hand (the client
/// then does what the test wants: read nothing, or hang up).
async fn post_raw(stream: &mut TcpStream, url: &str, path: &str, body: &Value) {
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        host(url),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
}

/// A stream of thousands of chunks: greedy decoding of this prompt by the
/// embedded model runs 2,777 tokens before its end of text (hundreds of
/// KB of events, far more than the socket, hyper and the two bounded
/// queues hold).
fn long_stream() -> Value {
    json!({
        "messages": [{ "role": "user", "content": "zz" }],
        "max_tokens": 4_000,
        "stream": true,
    })
}

/// API-CHAT-4: a client that opens a long stream and never reads it fills
/// the socket, the SSE queue and the piece channel; the engine cancels that
/// job instead of waiting on it, and other clients are served. Before, the
/// engine thread blocked on the full channel and no `/chat` ever came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_chat_4_a_stalled_stream_reader_does_not_block_other_clients() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // Small socket buffers on both ends (API-HTTP-5), so the stream backs
    // up into the server after tens of KB instead of the kernel's
    // autotuned MBs (more than this model's longest answer).
    let net = devnet_with(
        dir.path(),
        long_jobs(),
        HttpConfig {
            send_buffer_bytes: Some(16 * 1024),
            ..HttpConfig::default()
        },
    )
    .await;
    let url = net.nodes[0].api_url();

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(net.nodes[0].http_addr).await.unwrap();
    post_raw(&mut stalled, &url, "/v1/chat/completions", &long_stream()).await;
    // Read up to a second event: the job is running (the next one queues
    // behind it). From here on this client reads nothing.
    within("the stream's first events", async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while String::from_utf8_lossy(&seen).matches("data: ").count() < 2 {
            let n = stalled.read(&mut buf).await.unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;

    let (s, a) = within(
        "a /chat behind a stalled stream",
        post_json(&url, "/chat", &json!({ "prompt": "hi", "max_tokens": 4 })),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{a}");
    eventually("the stalled stream's cancellation", || async {
        (metric(&url, "blyan_inference_cancelled_total{reason=\"stalled\"}").await == Some(1))
            .then_some(())
    })
    .await;
    drop(stalled);
    net.stop().await;
}

/// API-CHAT-4: a client that hangs up cancels its generation at the next
/// token, streamed or not (before, it ran on to `max_tokens`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_chat_4_a_client_that_disconnects_cancels_its_generation() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(dir.path(), long_jobs()).await;
    let url = net.nodes[0].api_url();
    let disconnected = "blyan_inference_cancelled_total{reason=\"disconnected\"}";
    assert_eq!(metric(&url, disconnected).await, Some(0));

    // Streamed: read until the first content chunk (it runs), then hang up.
    let mut stream = TcpStream::connect(net.nodes[0].http_addr).await.unwrap();
    post_raw(&mut stream, &url, "/v1/chat/completions", &long_stream()).await;
    let mut seen = Vec::new();
    within("a first content chunk", async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"content\":\"") || seen.len() < 2048 {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the stream ended early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(stream);
    eventually("the streamed job's cancellation", || async {
        (metric(&url, disconnected).await == Some(1)).then_some(())
    })
    .await;

    // Not streamed: the request is read, then the client hangs up while it
    // is queued or generating.
    let mut plain = TcpStream::connect(net.nodes[0].http_addr).await.unwrap();
    post_raw(
        &mut plain,
        &url,
        "/chat",
        &json!({ "prompt": "hello", "max_tokens": 4_000 }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(plain);
    eventually("the plain job's cancellation", || async {
        (metric(&url, disconnected).await == Some(2)).then_some(())
    })
    .await;
    assert_eq!(
        metric(&url, "blyan_inference_cancelled_total{reason=\"stalled\"}").await,
        Some(0)
    );
    net.stop().await;
}

/// API-CHAT-5: a panic inside a job answers that request `500` with a clear
/// error; the engine is rebuilt and the next `/chat` is served; `/metrics`
/// counts the panic and the rebuild, `/health` is `ok` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_chat_5_a_panic_is_one_500_then_the_engine_is_rebuilt() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(
        dir.path(),
        InferenceConfig {
            panic_on_prompt: Some("PANIC".into()),
            ..InferenceConfig::default()
        },
    )
    .await;
    let url = net.nodes[0].api_url();
    let (s, h) = get_json(&url, "/health").await.unwrap();
    assert_eq!((s, h["inference"].as_str()), (200, Some("ok")), "{h}");

    let (s, e) = within(
        "the panicking /chat",
        post_json(
            &url,
            "/chat",
            &json!({ "prompt": "PANIC", "max_tokens": 8 }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(s, 500, "{e}");
    assert_eq!(e["reason"], "inference_failed", "{e}");
    assert!(e["message"].as_str().unwrap().contains("panicked"), "{e}");
    assert_eq!(metric(&url, "blyan_inference_panics_total").await, Some(1));

    let (s, a) = within(
        "the /chat after the panic",
        post_json(
            &url,
            "/chat",
            &json!({ "prompt": "hello", "max_tokens": 8 }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{a}");
    assert_eq!(
        metric(&url, "blyan_inference_engine_rebuilds_total").await,
        Some(1)
    );
    assert_eq!(metric(&url, "blyan_inference_engine_up").await, Some(1));
    let (s, h) = get_json(&url, "/health").await.unwrap();
    assert_eq!((s, h["inference"].as_str()), (200, Some("ok")), "{h}");
    net.stop().await;
}

/// API-CHAT-5: when the rebuild fails (here: the model's manifest is broken),
/// `/health` stops saying everything is fine and `/chat` fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_chat_5_a_failed_rebuild_makes_health_503() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let net = devnet(
        dir.path(),
        InferenceConfig {
            panic_on_prompt: Some("PANIC".into()),
            ..InferenceConfig::default()
        },
    )
    .await;
    let url = net.nodes[0].api_url();
    // The weight files stay (the running engine may still map them).
    let manifest = blyan_runtime::devnet::model_dir(&net.dir).join("manifest.json");
    std::fs::write(manifest, b"not json").unwrap();
    let (s, e) = within(
        "the panicking /chat",
        post_json(
            &url,
            "/chat",
            &json!({ "prompt": "PANIC", "max_tokens": 8 }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(s, 500, "{e}");
    // `rebuilding` (also 503) until the rebuild has failed.
    let h = eventually("/health to report the failed engine", || async {
        let (s, h) = get_json(&url, "/health").await.unwrap();
        assert_eq!(s == 503, h["reason"] == "inference_unavailable", "{h}");
        h["message"].as_str()?.contains("is failed").then_some(h)
    })
    .await;
    assert_eq!(h["code"], 4001, "{h}");
    assert_eq!(
        metric(&url, "blyan_inference_engine_rebuild_failures_total").await,
        Some(1)
    );
    assert_eq!(metric(&url, "blyan_inference_engine_up").await, Some(0));
    let (s, e) = within(
        "a /chat on a failed engine",
        post_json(
            &url,
            "/chat",
            &json!({ "prompt": "hello", "max_tokens": 8 }),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (s, e["reason"].as_str()),
        (500, Some("inference_failed")),
        "{e}"
    );
    net.stop().await;
}

/// A connection to `to` from the loopback address `from` (all of
/// 127.0.0.0/8 is loopback: a second client address for the per-address cap).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the server closes `stream`; what it sent before.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// `GET path` on a fresh connection from `from`: the status and body, or
/// `None` if the server closed the connection without an answer.
async fn get_from(from: [u8; 4], to: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = within("a connection", connect_from(from, to)).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n");
    // A connection closed at accept may refuse the write too.
    let _ = stream.write_all(req.as_bytes()).await;
    let answer = within("an answer or a close", until_closed(&mut stream)).await;
    if answer.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}

/// The value of the sample `name` in `/metrics`, asked from `from`.
async fn metric_from(from: [u8; 4], to: SocketAddr, name: &str) -> Option<u64> {
    let (status, text) = get_from(from, to, "/metrics").await?;
    assert_eq!(status, 200, "{text}");
    metric_value(&text, name)
}

/// Open file descriptors of this process (the node runs in it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

const FLOOD: usize = 250;
const PER_IP: usize = 100;
const LOCAL: [u8; 4] = [127, 0, 0, 1];
const OTHER: [u8; 4] = [127, 0, 0, 2];

/// API-HTTP-3: a flood of slow-loris connections from one address holds at
/// most `max_connections_per_ip` of the server's sockets; the rest are
/// closed at accept, before anything is read. Another address is served
/// meanwhile; the flood's address is served again once it stops. Before,
/// every connection was kept (and its file descriptor with it) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_http_3_slow_loris_floods_are_capped_per_address() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let net = devnet_with(
        dir.path(),
        InferenceConfig::default(),
        HttpConfig {
            // Long: in this test only the caps close connections.
            header_read_timeout_ms: 600_000,
            max_connections_per_ip: PER_IP,
            ..HttpConfig::default()
        },
    )
    .await;
    let addr = net.nodes[0].http_addr;
    let fds_before = open_fds();

    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let mut s = connect_from(LOCAL, addr).await;
        // Part of a request head, never finished.
        let _ = s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").await;
        flood.push(s);
    }
    let refused = "blyan_http_connections_refused_total{reason=\"per_ip\"}";
    eventually("the refusals over the cap", || async {
        (metric_from(OTHER, addr, refused).await == Some((FLOOD - PER_IP) as u64)).then_some(())
    })
    .await;
    // The cap held: this /metrics request is the only other connection.
    assert_eq!(
        metric_from(OTHER, addr, "blyan_http_connections_open").await,
        Some(PER_IP as u64 + 1)
    );
    // The process holds the flood's client sockets and at most PER_IP
    // server sockets (before: one per flood connection).
    eventually(
        "the refused connections' descriptors to be freed",
        || async { (open_fds() <= fds_before + FLOOD + PER_IP + 40).then_some(()) },
    )
    .await;
    // Over the cap: closed at once, unanswered. Another address: served.
    assert_eq!(get_from(LOCAL, addr, "/status").await, None);
    let (s, body) = get_from(OTHER, addr, "/status").await.expect("an answer");
    assert_eq!(s, 200, "{body}");

    // The flood ends: its address is served again.
    drop(flood);
    eventually("the flood's connections to close", || async {
        (metric_from(OTHER, addr, "blyan_http_connections_open").await == Some(1)).then_some(())
    })
    .await;
    let (s, body) = get_from(LOCAL, addr, "/status").await.expect("an answer");
    assert_eq!(s, 200, "{body}");
    net.stop().await;
}

/// API-HTTP-1/2: connections that never finish their request head (or send
/// nothing) are closed after the header timeout, a request whose body never
/// completes is answered 408 after the request timeout, a normal client is
/// served meanwhile, and a stream is not cut by the request timeout.
/// Before, all of them were kept open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_http_1_2_slow_clients_are_timed_out_while_others_are_served() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let net = devnet_with(
        dir.path(),
        long_jobs(),
        HttpConfig {
            header_read_timeout_ms: 1_000,
            request_timeout_ms: 2_000,
            ..HttpConfig::default()
        },
    )
    .await;
    let url = net.nodes[0].api_url();
    let addr = net.nodes[0].http_addr;

    let mut slow = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 10 != 0 {
            // Part of a head; every tenth sends nothing at all.
            s.write_all(b"POST /chat HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        slow.push(s);
    }
    let mut slow_body = TcpStream::connect(addr).await.unwrap();
    slow_body
        .write_all(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
        .await
        .unwrap();

    let (s, v) = within("a normal client", get_json(&url, "/status"))
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");

    for (i, s) in slow.iter_mut().enumerate() {
        let answer = within("a slow-loris connection to be closed", until_closed(s)).await;
        assert!(answer.is_empty(), "connection {i} got {answer:?}");
    }
    let answer = within("the slow body's answer", until_closed(&mut slow_body)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(
        metric(&url, "blyan_http_header_timeouts_total").await,
        Some(50)
    );
    assert_eq!(
        metric(&url, "blyan_http_request_timeouts_total").await,
        Some(1)
    );

    // A stream is answered at once and then runs past the request timeout
    // if it must: it ends with its finish reason, not a cut.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    post_raw(
        &mut stream,
        &url,
        "/v1/chat/completions",
        &json!({
            "messages": [{ "role": "user", "content": "hello" }],
            "max_tokens": 2_000,
            "stream": true,
        }),
    )
    .await;
    // The request asks for `Connection: keep-alive` by default; the stream
    // ends with a zero-size chunk, then the idle connection is closed by
    // the header timeout.
    let answer = within("the whole stream", until_closed(&mut stream)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("data: [DONE]"), "{answer}");
    assert!(
        answer.contains("\"finish_reason\":\"length\"")
            || answer.contains("\"finish_reason\":\"stop\""),
        "{answer}"
    );
    net.stop().await;
}
