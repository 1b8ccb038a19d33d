//! Node-to-node transport: signed, length-prefixed frames over plain TCP.
//!
//! **Interim.** The issue asks for tonic with mutual TLS 1.3 bound to the
//! node key; this module is the stand-in behind a small boundary so it can be
//! swapped: the node service sees only [`Outbound`] (send, broadcast, peer
//! count) and a bounded channel of [`Inbound`] messages. Nothing else in the
//! runtime knows about TCP or frames.
//!
//! Frame (after a 4-byte big-endian length, at most [`MAX_FRAME_BYTES`]):
//! `version (1) ‖ sender public key (33, SEC1 compressed) ‖ timestamp_ms (8,
//! big-endian) ‖ signature (64) ‖ payload`, where the payload is a batch of
//! messages, `count (4, big-endian, 1..=MAX_BATCH_MESSAGES) ‖ (length (4,
//! big-endian) ‖ canonical WireMessage bytes) × count`, and the signature is
//! ECDSA secp256k1 over `signing_bytes(Domain::PeerMessage, chain_id,
//! timestamp_ms ‖ payload)` (SIG-1: the peer-message domain, so no peer frame
//! is valid as a vote or a transaction). Every frame is authenticated on its
//! own, so connections need no handshake: each node dials every peer for its
//! outgoing frames and reads frames from the connections peers dial to it.
//! Batching is what keeps the transport's own signatures off the critical
//! path under load: a writer signs once for everything queued for its peer
//! (one message when idle, hundreds of gossiped transactions under load), and
//! the receiver verifies once per frame.
//!
//! Receiving: a frame that is too long, malformed, from a sender outside the
//! configured peer list, or with a bad signature is dropped with a log line
//! and the connection is closed; a frame whose timestamp is more than
//! [`MAX_CLOCK_SKEW_MS`] from the receiver's clock is dropped and logged
//! (the connection stays). Inbound connections are bounded
//! ([`TransportConfig::max_inbound_connections`]).
//!
//! Sending: one bounded queue of encoded messages per peer; when it is full
//! the message is dropped (consensus tolerates loss). A writer task per peer
//! connects with exponential backoff, waits [`BATCH_LINGER`] after an idle
//! queue yields a message, takes everything queued (up to
//! [`MAX_BATCH_MESSAGES`] and the frame limit), seals it into one frame and
//! writes it; it reconnects after any write error (the batch is lost).
//!
//! Transaction replay is not this layer's concern (transactions carry their
//! own nonce and signature), and a replayed consensus frame within the skew
//! window is a duplicate that consensus ignores.

use crate::Error;
use blyan_state_machine::crypto::{sign, verify_signature};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::node::{PeerId, WireMessage};
use blyan_state_machine::tx::{Domain, PublicKey, public_key_of, signing_bytes};
use blyan_state_machine::types::Address;
use k256::ecdsa::SigningKey;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Largest frame accepted or sent (the length prefix excluded).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// A frame's timestamp may differ from the receiver's clock by at most this.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Most messages in one frame.
pub const MAX_BATCH_MESSAGES: usize = 4_096;
/// After an idle queue yields a message, the writer waits this long before
/// sealing, so that the transactions a busy node admits in that time share
/// one signature (without it, at ~1,000 tx/s each transaction went out in a
/// frame of its own: one sign and one verify per peer and message). It
/// bounds a busy writer to 200 frames/s and delays a message by 5 ms at most.
pub const BATCH_LINGER: Duration = Duration::from_millis(5);
/// Version 2: the payload is a batch of messages (version 1 carried one).
const FRAME_VERSION: u8 = 2;
const HEADER_BYTES: usize = 1 + 33 + 8 + 64;
/// Largest batch payload: the frame limit less the header.
const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - HEADER_BYTES;

/// A message received from an authenticated peer.
pub type Inbound = (PeerId, WireMessage);

/// What the node service needs from a transport. Sends never block and may
/// be lost.
pub trait Outbound: Send + Sync + 'static {
    fn send(&self, to: PeerId, message: &WireMessage);
    fn broadcast(&self, message: &WireMessage);
    /// Peers with an open outgoing connection.
    fn connected_peers(&self) -> usize;
}

/// A configured peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// `host:port` of its P2P listener.
    pub addr: String,
    pub public_key: PublicKey,
}

impl Peer {
    pub fn id(&self) -> Option<PeerId> {
        Address::from_sec1(&self.public_key)
    }
}

/// Transport parameters (defaults in [`TransportConfig::default`]).
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub chain_id: String,
    /// The only senders whose frames are accepted, and the peers dialled.
    pub peers: Vec<Peer>,
    /// Messages queued per peer before new ones are dropped (default 16384:
    /// a few seconds of gossiped transactions under load).
    pub outbound_queue_messages: usize,
    /// Inbound connections served at once (default 64).
    pub max_inbound_connections: usize,
    /// First reconnect delay (default 100 ms), doubled up to `reconnect_max_ms` (default 5000 ms).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl TransportConfig {
    pub fn new(chain_id: String, peers: Vec<Peer>) -> TransportConfig {
        TransportConfig {
            chain_id,
            peers,
            outbound_queue_messages: 16_384,
            max_inbound_connections: 64,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
        }
    }
}

/// Milliseconds since the Unix epoch (the node clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A complete frame (length prefix included) carrying `messages`, signed by `key`.
pub fn seal(
    key: &SigningKey,
    chain_id: &str,
    timestamp_ms: u64,
    messages: &[WireMessage],
) -> Vec<u8> {
    let encoded: Vec<Vec<u8>> = messages.iter().map(|m| m.encode()).collect();
    let parts: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    seal_encoded(key, chain_id, timestamp_ms, &parts)
}

/// [`seal`] over messages already canonically encoded.
pub fn seal_encoded(
    key: &SigningKey,
    chain_id: &str,
    timestamp_ms: u64,
    messages: &[&[u8]],
) -> Vec<u8> {
    assert!(!messages.is_empty() && messages.len() <= MAX_BATCH_MESSAGES);
    let payload_len = 4 + messages.iter().map(|m| 4 + m.len()).sum::<usize>();
    let mut signed = Vec::with_capacity(8 + payload_len);
    signed.extend_from_slice(&timestamp_ms.to_be_bytes());
    signed.extend_from_slice(&(messages.len() as u32).to_be_bytes());
    for m in messages {
        signed.extend_from_slice(&(m.len() as u32).to_be_bytes());
        signed.extend_from_slice(m);
    }
    let signature = sign(key, &signing_bytes(Domain::PeerMessage, chain_id, &signed));
    let len = HEADER_BYTES + payload_len;
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.push(FRAME_VERSION);
    frame.extend_from_slice(&public_key_of(key));
    frame.extend_from_slice(&timestamp_ms.to_be_bytes());
    frame.extend_from_slice(&signature);
    frame.extend_from_slice(&signed[8..]);
    assert_eq!(frame.len(), 4 + len);
    frame
}

/// Splits a batch payload into its messages, decoding each.
fn decode_batch(mut payload: &[u8]) -> Result<Vec<WireMessage>, Error> {
    let bad = |m: String| Error::FrameMalformed(format!("payload: {m}"));
    let take_u32 = |p: &mut &[u8]| -> Result<usize, Error> {
        let (head, rest) = p
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("truncated length".into()))?;
        *p = rest;
        Ok(u32::from_be_bytes(*head) as usize)
    };
    let count = take_u32(&mut payload)?;
    if count == 0 || count > MAX_BATCH_MESSAGES {
        return Err(bad(format!(
            "{count} messages; a frame carries 1..={MAX_BATCH_MESSAGES}"
        )));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let len = take_u32(&mut payload)?;
        if len > payload.len() {
            return Err(bad(format!("message {i} runs past the frame")));
        }
        let (m, rest) = payload.split_at(len);
        out.push(WireMessage::decode(m).map_err(|e| bad(format!("message {i}: {e}")))?);
        payload = rest;
    }
    if !payload.is_empty() {
        return Err(bad(format!(
            "{} bytes after the last message",
            payload.len()
        )));
    }
    Ok(out)
}

/// Checks a frame body (without its length prefix) from a peer in `peers`;
/// cheap checks first, the signature before decoding the payload. Returns the
/// sender and its messages, in order.
pub fn open(
    frame: &[u8],
    chain_id: &str,
    peers: &BTreeMap<PublicKey, PeerId>,
    now_ms: u64,
) -> Result<(PeerId, Vec<WireMessage>), Error> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(Error::FrameTooLarge {
            len: frame.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    if frame.len() < HEADER_BYTES {
        return Err(Error::FrameMalformed(format!(
            "{} bytes, shorter than the {HEADER_BYTES}-byte header",
            frame.len()
        )));
    }
    if frame[0] != FRAME_VERSION {
        return Err(Error::FrameMalformed(format!("version {}", frame[0])));
    }
    let public_key: PublicKey = frame[1..34].try_into().expect("33 bytes");
    let timestamp_ms = u64::from_be_bytes(frame[34..42].try_into().expect("8 bytes"));
    let signature: [u8; 64] = frame[42..106].try_into().expect("64 bytes");
    let Some(&from) = peers.get(&public_key) else {
        return Err(Error::UnknownPeer(hex::encode(public_key)));
    };
    if timestamp_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW_MS {
        return Err(Error::StaleFrame {
            timestamp_ms,
            now_ms,
            max_skew_ms: MAX_CLOCK_SKEW_MS,
        });
    }
    let mut signed = Vec::with_capacity(8 + frame.len() - HEADER_BYTES);
    signed.extend_from_slice(&frame[34..42]);
    signed.extend_from_slice(&frame[HEADER_BYTES..]);
    if !verify_signature(
        &public_key,
        &signing_bytes(Domain::PeerMessage, chain_id, &signed),
        &signature,
    ) {
        return Err(Error::BadFrameSignature);
    }
    Ok((from, decode_batch(&frame[HEADER_BYTES..])?))
}

/// The TCP transport. See the module docs.
pub struct TcpTransport {
    queues: BTreeMap<PeerId, mpsc::Sender<Arc<Vec<u8>>>>,
    connected: Arc<AtomicUsize>,
}

impl TcpTransport {
    /// Starts accepting frames on `listener` (delivered to `inbound`) and a
    /// writer task per peer other than this node, all spawned into `tasks`.
    pub fn start(
        listener: TcpListener,
        key: SigningKey,
        config: TransportConfig,
        inbound: mpsc::Sender<Inbound>,
        tasks: &mut JoinSet<()>,
    ) -> Result<Arc<TcpTransport>, Error> {
        let me = public_key_of(&key);
        let mut known = BTreeMap::new();
        for p in &config.peers {
            let id = p.id().ok_or_else(|| {
                Error::Config(format!("peer {} has an invalid public key", p.addr))
            })?;
            known.insert(p.public_key, id);
        }
        let connected = Arc::new(AtomicUsize::new(0));
        let mut queues = BTreeMap::new();
        for p in config.peers.iter().filter(|p| p.public_key != me) {
            let (tx, rx) = mpsc::channel(config.outbound_queue_messages);
            queues.insert(p.id().expect("checked above"), tx);
            tasks.spawn(write_loop(
                p.addr.clone(),
                rx,
                Signer {
                    key: key.clone(),
                    chain_id: config.chain_id.clone(),
                },
                connected.clone(),
                config.reconnect_min_ms,
                config.reconnect_max_ms,
            ));
        }
        let limit = Arc::new(Semaphore::new(config.max_inbound_connections));
        tasks.spawn(accept_loop(
            listener,
            Arc::new(known),
            config.chain_id.clone(),
            inbound,
            limit,
        ));
        Ok(Arc::new(TcpTransport { queues, connected }))
    }

    fn enqueue(&self, to: &PeerId, message: &Arc<Vec<u8>>) {
        if let Some(q) = self.queues.get(to)
            && q.try_send(message.clone()).is_err()
        {
            debug!(peer = %to, "outbound queue full or closed; message dropped");
        }
    }

    /// The canonical bytes of `message`, if it fits in a frame alone.
    fn encode(message: &WireMessage) -> Option<Arc<Vec<u8>>> {
        let bytes = message.encode();
        if 8 + bytes.len() > MAX_PAYLOAD_BYTES {
            warn!(
                bytes = bytes.len(),
                "outgoing message exceeds the frame limit; dropped"
            );
            return None;
        }
        Some(Arc::new(bytes))
    }
}

impl Outbound for TcpTransport {
    fn send(&self, to: PeerId, message: &WireMessage) {
        if let Some(f) = Self::encode(message) {
            self.enqueue(&to, &f);
        }
    }
    fn broadcast(&self, message: &WireMessage) {
        if let Some(f) = Self::encode(message) {
            for to in self.queues.keys() {
                self.enqueue(to, &f);
            }
        }
    }
    fn connected_peers(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }
}

/// What a writer signs its frames with.
struct Signer {
    key: SigningKey,
    chain_id: String,
}

/// Takes `first` and whatever else is queued, up to [`MAX_BATCH_MESSAGES`]
/// and [`MAX_PAYLOAD_BYTES`]; a message that does not fit is left in `carry`.
fn take_batch(
    first: Arc<Vec<u8>>,
    queue: &mut mpsc::Receiver<Arc<Vec<u8>>>,
    carry: &mut Option<Arc<Vec<u8>>>,
) -> Vec<Arc<Vec<u8>>> {
    let mut bytes = 4 + 4 + first.len();
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_MESSAGES {
        let Ok(m) = queue.try_recv() else { break };
        if bytes + 4 + m.len() > MAX_PAYLOAD_BYTES {
            *carry = Some(m);
            break;
        }
        bytes += 4 + m.len();
        batch.push(m);
    }
    batch
}

async fn write_loop(
    addr: String,
    mut queue: mpsc::Receiver<Arc<Vec<u8>>>,
    signer: Signer,
    connected: Arc<AtomicUsize>,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
) {
    let mut backoff_ms = backoff_min_ms;
    let mut carry: Option<Arc<Vec<u8>>> = None;
    loop {
        let mut stream = match TcpStream::connect(&addr).await {
            Ok(s) => s,
            Err(e) => {
                debug!(%addr, error = %e, backoff_ms, "connect failed; retrying");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(backoff_max_ms);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        info!(%addr, "connected to peer");
        backoff_ms = backoff_min_ms;
        connected.fetch_add(1, Ordering::Relaxed);
        let closed = loop {
            let first = match carry.take() {
                Some(m) => m,
                None => match queue.recv().await {
                    Some(m) => {
                        tokio::time::sleep(BATCH_LINGER).await;
                        m
                    }
                    None => break true,
                },
            };
            let batch = take_batch(first, &mut queue, &mut carry);
            let parts: Vec<&[u8]> = batch.iter().map(|m| m.as_slice()).collect();
            let frame = seal_encoded(&signer.key, &signer.chain_id, now_ms(), &parts);
            if let Err(e) = stream.write_all(&frame).await {
                info!(%addr, error = %e, messages = batch.len(), "peer connection lost; batch dropped, reconnecting");
                break false;
            }
        };
        connected.fetch_sub(1, Ordering::Relaxed);
        if closed {
            return; // The transport was dropped.
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    known: Arc<BTreeMap<PublicKey, PeerId>>,
    chain_id: String,
    inbound: mpsc::Sender<Inbound>,
    limit: Arc<Semaphore>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%remote, "too many inbound connections; refused");
            continue;
        };
        let (known, chain_id, inbound) = (known.clone(), chain_id.clone(), inbound.clone());
        tokio::spawn(async move {
            read_loop(stream, remote, &known, &chain_id, &inbound).await;
            drop(permit);
        });
    }
}

async fn read_loop(
    mut stream: TcpStream,
    remote: std::net::SocketAddr,
    known: &BTreeMap<PublicKey, PeerId>,
    chain_id: &str,
    inbound: &mpsc::Sender<Inbound>,
) {
    let mut buf = Vec::new();
    loop {
        let len = match stream.read_u32().await {
            Ok(n) => n as usize,
            Err(_) => return, // Closed.
        };
        if len > MAX_FRAME_BYTES {
            let e = Error::FrameTooLarge {
                len,
                max: MAX_FRAME_BYTES,
            };
            warn!(%remote, error = %e, "closing peer connection");
            return;
        }
        buf.resize(len, 0);
        if stream.read_exact(&mut buf).await.is_err() {
            return;
        }
        match open(&buf, chain_id, known, now_ms()) {
            Ok((from, messages)) => {
                for m in messages {
                    if inbound.send((from, m)).await.is_err() {
                        return; // The node stopped.
                    }
                }
            }
            Err(e) if e.closes_connection() => {
                warn!(%remote, error = %e, "garbage from peer; closing connection");
                return;
            }
            Err(e) => warn!(%remote, error = %e, "peer frame dropped"),
        }
    }
}
