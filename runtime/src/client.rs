//! A minimal HTTP/1.1 client for the CLI and tests: one request per
//! connection (`Connection: close`), plain `http://host:port` only, responses
//! bounded to [`MAX_RESPONSE_BYTES`]; and [`Connection`], a keep-alive
//! connection for the load generator (`blyan bench`).

use crate::Error;
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::ledger::intrinsic_gas;
use blyan_state_machine::tx::{TxBody, TxKind};
use blyan_state_machine::types::Address;
use k256::ecdsa::SigningKey;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest response read.
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// Sends one request to `base` (`http://host:port`) and returns the status and body.
pub async fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), Error> {
    let r = send(base, method, path, &[], body).await?;
    Ok((r.status, r.body))
}

/// A response of [`send`].
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// `(lower-case name, value)` pairs.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Like [`request`], with extra request headers, returning the response's headers too.
pub async fn send(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, Error> {
    let host = base
        .strip_prefix("http://")
        .ok_or_else(|| {
            Error::Http(format!(
                "{base:?}: only http://host:port URLs are supported"
            ))
        })?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(host)
        .await
        .map_err(|e| Error::Http(format!("connect {host}: {e}")))?;
    let body = body.unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    let io = |e: std::io::Error| Error::Http(format!("{method} {path}: {e}"));
    // A server may answer (413) and close before reading a large body: a
    // failed write is reported only if no response can be read either.
    let written = match stream.write_all(head.as_bytes()).await {
        Ok(()) => stream.write_all(body).await,
        Err(e) => Err(e),
    };
    let mut raw = Vec::new();
    let read = stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw).await;
    match (parse_full(&raw), written, read) {
        (Ok(r), _, _) => Ok(r),
        (Err(_), Err(e), _) | (Err(_), Ok(()), Err(e)) => Err(io(e)),
        (Err(e), Ok(()), Ok(_)) => Err(e),
    }
}

/// Largest response head (status line and headers) a [`Connection`] reads.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

fn host_of(base: &str) -> Result<&str, Error> {
    Ok(base
        .strip_prefix("http://")
        .ok_or_else(|| {
            Error::Http(format!(
                "{base:?}: only http://host:port URLs are supported"
            ))
        })?
        .trim_end_matches('/'))
}

/// A keep-alive HTTP/1.1 connection: one request at a time, each answer read
/// by its `Content-Length` (chunked answers are refused). After any error the
/// connection is unusable; open a new one.
pub struct Connection {
    host: String,
    stream: BufReader<TcpStream>,
}

impl Connection {
    pub async fn connect(base: &str) -> Result<Connection, Error> {
        let host = host_of(base)?.to_string();
        let stream = TcpStream::connect(&host)
            .await
            .map_err(|e| Error::Http(format!("connect {host}: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            host,
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request and reads its answer: `(status, body)`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), Error> {
        let io = |e: std::io::Error| Error::Http(format!("{method} {path}: {e}"));
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        self.stream
            .get_mut()
            .write_all(&request)
            .await
            .map_err(io)?;
        let mut status: Option<u16> = None;
        let mut length: Option<u64> = None;
        let mut head_bytes = 0usize;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = self.stream.read_until(b'\n', &mut line).await.map_err(io)?;
            if n == 0 {
                return Err(Error::Http(format!("{method} {path}: connection closed")));
            }
            head_bytes += n;
            if head_bytes > MAX_HEAD_BYTES {
                return Err(Error::Http(format!(
                    "{method} {path}: response head over {MAX_HEAD_BYTES} bytes"
                )));
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text.is_empty() {
                break;
            }
            if status.is_none() {
                status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
                if status.is_none() {
                    return Err(Error::Http(format!("bad status line {text:?}")));
                }
                continue;
            }
            let lower = text.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = Some(
                    v.trim()
                        .parse()
                        .map_err(|_| Error::Http(format!("bad header {text:?}")))?,
                );
            } else if lower.starts_with("transfer-encoding:") {
                return Err(Error::Http(format!(
                    "{method} {path}: {text:?} is not supported on a keep-alive connection"
                )));
            }
        }
        let status = status.ok_or_else(|| Error::Http("empty response".into()))?;
        let length = length.ok_or_else(|| {
            Error::Http(format!("{method} {path}: response has no Content-Length"))
        })?;
        if length > MAX_RESPONSE_BYTES {
            return Err(Error::Http(format!(
                "{method} {path}: response of {length} bytes over the {MAX_RESPONSE_BYTES}-byte limit"
            )));
        }
        let mut body = vec![0u8; length as usize];
        self.stream.read_exact(&mut body).await.map_err(io)?;
        Ok((status, body))
    }
}

#[cfg(test)]
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), Error> {
    parse_full(raw).map(|r| (r.status, r.body))
}

fn parse_full(raw: &[u8]) -> Result<Response, Error> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::Http("response has no header terminator".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Http(format!("bad status line in {head:?}")))?;
    let body = &raw[split + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        },
    })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| Error::Http("truncated chunked body".into()))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| Error::Http(format!("bad chunk size {size_text:?}")))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err(Error::Http("truncated chunk".into()));
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// `GET` returning JSON.
/// `GET /status` of a node, if it answers 200.
pub async fn status(base: &str) -> Option<Value> {
    match get_json(base, "/status").await {
        Ok((200, v)) => Some(v),
        _ => None,
    }
}

/// The committed height a node reports on `GET /status`, if it answers.
pub async fn height(base: &str) -> Option<u64> {
    status(base).await.and_then(|v| v["height"].as_u64())
}

pub async fn get_json(base: &str, path: &str) -> Result<(u16, Value), Error> {
    let (status, body) = request(base, "GET", path, None).await?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| Error::Http(format!("GET {path}: response is not JSON: {e}")))?;
    Ok((status, v))
}

/// How long the CLI's own requests wait out a rate limit (API-RATE-*).
const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(60);

/// Runs `call` again while it answers 429 (after the 1 s the limiter's
/// refill takes), for at most [`RATE_LIMIT_PATIENCE`]: the devnet and the
/// CLI poll a node's public API, whose per-IP limit (100 a minute by
/// default) a few transactions' polling can reach.
async fn patiently<F, Fut>(mut call: F) -> Result<(u16, Value), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(u16, Value), Error>>,
{
    let deadline = Instant::now() + RATE_LIMIT_PATIENCE;
    loop {
        let (s, v) = call().await?;
        if s != 429 || Instant::now() >= deadline {
            return Ok((s, v));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `GET path` as [`get_json`], waiting out rate limits.
pub async fn get_json_patient(base: &str, path: &str) -> Result<(u16, Value), Error> {
    patiently(|| get_json(base, path)).await
}

/// `POST` a JSON body, returning JSON.
pub async fn post_json(base: &str, path: &str, body: &Value) -> Result<(u16, Value), Error> {
    let (status, body) = request(base, "POST", path, Some(body.to_string().as_bytes())).await?;
    let v = serde_json::from_slice(&body)
        .map_err(|e| Error::Http(format!("POST {path}: response is not JSON: {e}")))?;
    Ok((status, v))
}

/// Signs `kind` with the account's next nonce.
pub async fn sign_tx(
    node: &str,
    key: &SigningKey,
    kind: TxKind,
) -> Result<blyan_state_machine::tx::SignedTx, Error> {
    sign_tx_with_tip(node, key, kind, 1_000_000_000).await
}

/// [`sign_tx`] with the priority fee `tip` (per gas); the fee cap is twice
/// the next base fee plus the tip.
pub async fn sign_tx_with_tip(
    node: &str,
    key: &SigningKey,
    kind: TxKind,
    tip: u128,
) -> Result<blyan_state_machine::tx::SignedTx, Error> {
    let from = Address::from_public_key(key.verifying_key());
    let account = get_ok(node, &format!("/account/{from}")).await?;
    let status = get_ok(node, "/status").await?;
    let nonce = account["nonce"]
        .as_u64()
        .ok_or_else(|| Error::Http("no nonce".into()))?;
    let chain_id = status["chain_id"].as_str().unwrap_or_default().to_string();
    let base_fee: u128 = status["next_base_fee_per_gas"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Http("no next_base_fee_per_gas".into()))?;
    Ok(TxBody {
        nonce,
        gas_limit: intrinsic_gas(&kind),
        max_fee_per_gas: base_fee.saturating_mul(2).saturating_add(tip),
        max_priority_fee_per_gas: tip,
        kind,
    }
    .sign(&chain_id, key))
}

/// Waits until transaction `id` is committed; its height. A failed
/// receipt is an error.
pub async fn wait_committed(node: &str, id: &str, what: &str) -> Result<u64, Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, r) = get_json_patient(node, &format!("/tx/{id}")).await?;
        if s == 200 && r["height"].is_u64() {
            if let Some(why) = r["failure"].as_str() {
                return Err(Error::Http(format!("{what} {id} failed: {why}")));
            }
            return Ok(r["height"].as_u64().unwrap_or(0));
        }
        if s == 410 {
            return Err(Error::Http(format!("{what} {id} was dropped: {r}")));
        }
        if Instant::now() > deadline {
            return Err(Error::Http(format!(
                "{what} {id} not committed within 120 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Signs `kind` with `key` (nonce and fee from `node`), submits it through
/// `POST /tx` and waits until it commits successfully; its id.
pub async fn submit_and_wait(
    node: &str,
    key: &SigningKey,
    kind: TxKind,
    what: &str,
) -> Result<blyan_state_machine::types::Hash32, Error> {
    let tx = sign_tx(node, key, kind).await?;
    let id = tx.id();
    let body = json!({ "tx": format!("0x{}", hex::encode(tx.encode())) });
    let (s, reply) = patiently(|| post_json(node, "/tx", &body)).await?;
    if !(200..300).contains(&s) {
        return Err(Error::Http(format!("{what}: HTTP {s}: {reply}")));
    }
    wait_committed(node, &format!("0x{}", hex::encode(id)), what).await?;
    Ok(id)
}

/// `GET path` whose status must be 2xx; its JSON body.
pub async fn get_ok(node: &str, path: &str) -> Result<Value, Error> {
    let (s, v) = get_json_patient(node, path).await?;
    if (200..300).contains(&s) {
        Ok(v)
    } else {
        Err(Error::Http(format!("GET {path}: HTTP {s}: {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"ok"[..]));
        let raw = b"HTTP/1.1 413 Payload Too Large\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_slice()), (413, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
