//! Node-to-node transport: gRPC over HTTP/2 (tonic) over mutual TLS 1.3,
//! each side's certificate bound to its node key ([`crate::tls`]), carrying
//! signed batches of messages (spec NODE-NET-1 to NODE-NET-4).
//!
//! The node service sees only [`Outbound`] (send, broadcast, peer count) and
//! a bounded channel of [`Inbound`] messages; nothing else in the runtime
//! knows about TLS, HTTP/2 or frames.
//!
//! **Service** `blyan.p2p.v1.Peer`, written by hand over a raw-bytes codec
//! ([`BytesCodec`]: no protobuf, no code generation), three methods:
//! - `Deliver` (unary): request = one frame body (below), response empty;
//! - `BlobManifest` (unary): request = blob id (32 bytes), response = the
//!   manifest ([`crate::blobs::BlobManifest::encode`]);
//! - `FetchBlob` (server streaming): request = `blob id (32) ‖ from_chunk (4,
//!   big-endian)`, response = one message per chunk from `from_chunk` on,
//!   `index (4, big-endian) ‖ chunk bytes` (at most 1 MiB);
//! - `BlobByRoot` (unary, NODE-NET-12): request = a PoL payload Merkle root
//!   (POL-3, 32 bytes), response = the id (32 bytes) of the complete blob
//!   with that payload, or `NotFound`.
//!
//! **Authentication, two layers.** The TLS handshake proves which admitted
//! node (a seed, a validator or a registered node: NODE-ADMIT-1,
//! [`crate::admission`]) is at the other end (both directions; anyone else fails the
//! handshake and is logged and counted, [`NetCounters::handshakes_failed`]).
//! On top, every frame still carries its sender, a timestamp and a signature
//! (the issue requires messages that authenticate on their own, e.g. when
//! relayed or logged), and a frame is accepted only if its signer is the
//! TLS-authenticated peer ([`Error::SenderMismatch`]).
//!
//! Frame (a `Deliver` request, at most [`MAX_FRAME_BYTES`]):
//! `version (1) ‖ sender public key (33, SEC1 compressed) ‖ timestamp_ms (8,
//! big-endian) ‖ signature (64) ‖ payload`, where the payload is a batch of
//! messages, `count (4, big-endian, 1..=MAX_BATCH_MESSAGES) ‖ (length (4,
//! big-endian) ‖ canonical WireMessage bytes) × count`, and the signature is
//! ECDSA secp256k1 over `signing_bytes(Domain::PeerMessage, chain_id,
//! timestamp_ms ‖ payload)` (SIG-1: the peer-message domain, so no peer frame
//! is valid as a vote or a transaction). ([`seal`] returns it behind a
//! 4-byte length prefix, which the gRPC message framing replaces.)
//! Batching keeps the transport's own signatures off the critical path
//! under load: a writer signs once for everything queued for its peer.
//!
//! Receiving: a frame that is malformed, from a sender outside the peer
//! list, with a bad signature, or signed by someone other than the TLS peer
//! is refused (gRPC status `InvalidArgument`/`PermissionDenied`) with a log
//! line; a frame whose timestamp is more than [`MAX_CLOCK_SKEW_MS`] from the
//! receiver's clock is refused as stale (`FailedPrecondition`). The
//! connection stays up in every case: the peer already proved who it is.
//!
//! Compression: frames of [`GZIP_THRESHOLD_BYTES`] or more are sent gzip
//! compressed (gRPC message compression); blob chunks are served gzip
//! compressed to clients that accept it. Small frames (votes) are not:
//! compressing them costs more than it saves.
//!
//! **Bounds**, so one slow or hostile peer cannot exhaust memory:
//! - one bounded send queue per peer ([`TransportConfig::outbound_queue_messages`]);
//!   a full queue drops the message (consensus tolerates loss);
//! - connections still in their TLS handshake have a budget of their own
//!   ([`TransportConfig::max_pending_handshakes`], at most
//!   [`TransportConfig::max_handshakes_per_source`] per source address, the
//!   oldest evicted when full) and must finish within
//!   [`TransportConfig::handshake_timeout_ms`] (NODE-NET-6, [`crate::inbound`]);
//!   established connections, which only admitted peers reach, are capped
//!   apart ([`TransportConfig::max_inbound_connections`]), at most
//!   [`TransportConfig::max_connections_per_peer`] per validator, so a flood
//!   of handshakes never keeps a restarted validator out;
//! - everything refused or dropped is counted ([`NetCounters`], `/metrics`,
//!   NODE-NET-7), never lost silently;
//! - per connection, HTTP/2 streams are capped ([`MAX_STREAMS_PER_CONNECTION`])
//!   and so is every message ([`MAX_FRAME_BYTES`] in, chunk size plus header
//!   for blobs), decompressed size included;
//! - inbound messages go to the node's bounded queue; a full queue
//!   back-pressures the peer's stream (its unary call waits), which h2 flow
//!   control turns into a slower peer, not more memory;
//! - a blob stream holds at most [`BLOB_STREAM_BUFFER_CHUNKS`] chunks ahead
//!   of the network.
//!
//! Sending: a writer task per peer dials it (TCP, TLS, HTTP/2, with
//! exponential backoff), takes the next message and everything queued
//! behind it; if that is only transaction gossip it lingers up to
//! [`BATCH_LINGER`] for more, ending early when a consensus message comes
//! (proposals and votes are never delayed); it takes up to
//! [`MAX_BATCH_MESSAGES`] and the frame limit), seals it into one frame and
//! delivers it; after a transport error it reconnects (the batch is lost).
//!
//! **Partitions** (a test and operations hook): [`GrpcTransport::set_blocked`]
//! drops every frame to and from the given peers until changed.
//!
//! Transaction replay is not this layer's concern (transactions carry their
//! own nonce and signature), and a replayed consensus frame within the skew
//! window is a duplicate that consensus ignores.

use crate::Error;
use crate::admission::PeerPlan;
use crate::blobs::{BlobId, BlobManifest, BlobStore, CHUNK_BYTES};
use crate::inbound::{Admission, HandshakeBudget};
use crate::tls::{Admitted, NodeCertificate, PeerCertVerifier, SERVER_NAME, peer_identity};
use blyan_state_machine::crypto::{sign, verify_signature};
use blyan_state_machine::encoding::Canonical;
use blyan_state_machine::node::{PeerId, WireMessage};
use blyan_state_machine::tx::{Domain, PublicKey, public_key_of, signing_bytes};
use blyan_state_machine::types::Address;
use bytes::{Buf, BufMut, Bytes};
use k256::ecdsa::SigningKey;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::{Instrument, debug, info, warn};

/// Largest frame accepted or sent (the length prefix excluded).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// HTTP/2 flow-control windows (per stream, per connection), both ways.
/// h2's default of 64 KiB made a 250 KB proposal frame wait for several
/// window updates, each needing the receiving task to run: tens of ms
/// under load. A window bounds what a peer may send unread, so memory stays
/// bounded: at most this per connection, and connections are capped.
pub const H2_STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
pub const H2_CONNECTION_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// A frame's timestamp may differ from the receiver's clock by at most this.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Most messages in one frame.
pub const MAX_BATCH_MESSAGES: usize = 4_096;
/// After an idle queue yields a transaction, the writer waits up to this
/// long for more before sealing, so that the transactions a busy node admits
/// in that time share one signature (without it, at ~1,000 tx/s each
/// transaction went out in a frame of its own: one sign and one verify per
/// peer and message). It bounds a writer carrying only gossip to 100
/// frames/s. Consensus messages do not wait: one ends the linger at once.
pub const BATCH_LINGER: Duration = Duration::from_millis(10);
/// Frames of at least this many bytes are sent gzip compressed.
pub const GZIP_THRESHOLD_BYTES: usize = 16 * 1024;
/// HTTP/2 streams (concurrent calls) one connection may have open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Chunks a blob stream reads ahead of the network.
pub const BLOB_STREAM_BUFFER_CHUNKS: usize = 2;
/// What gzip may add to an incompressible message (tonic checks the size
/// limits on the compressed message too); deflate's worst case is a few
/// bytes per 16 KiB block.
const COMPRESSION_SLACK_BYTES: usize = 64 * 1024;
/// Largest blob-stream message: a chunk and its 4-byte index.
const MAX_CHUNK_MESSAGE_BYTES: usize = CHUNK_BYTES + 4 + COMPRESSION_SLACK_BYTES;
/// Largest manifest message (a 64 GiB blob's).
const MAX_MANIFEST_MESSAGE_BYTES: usize = 12
    + 32 * (crate::blobs::MAX_BLOB_BYTES / CHUNK_BYTES as u64) as usize
    + COMPRESSION_SLACK_BYTES;
/// Version 2: the payload is a batch of messages (version 1 carried one).
const FRAME_VERSION: u8 = 2;
const HEADER_BYTES: usize = 1 + 33 + 8 + 64;
/// Largest batch payload: the frame limit less the header.
const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - HEADER_BYTES;
/// NODE-SYNC-5: the largest `NodeConfig::sync_batch_bytes` this transport
/// carries: a reply of that many bytes of blocks, plus the encoding's own
/// overhead (well under 64 KiB for 32 blocks), fits in one frame.
pub const MAX_SYNC_BATCH_BYTES: u64 = (MAX_PAYLOAD_BYTES - 8 - 64 * 1024) as u64;

/// A message received from an authenticated peer. NODE-NET-11: it holds one
/// of its sender's [`TransportConfig::inbound_messages_per_peer`] permits
/// until the node drops it (after handling it), so one peer's backlog never
/// takes another's room in the node's queue.
#[derive(Debug)]
pub struct Inbound {
    pub from: PeerId,
    pub message: WireMessage,
    _quota: Option<OwnedSemaphorePermit>,
}

impl Inbound {
    /// A message counted against no quota (tests, local injection).
    pub fn new(from: PeerId, message: WireMessage) -> Inbound {
        Inbound {
            from,
            message,
            _quota: None,
        }
    }

    /// The sender, the message, and the quota permit to hold until the
    /// message has been handled.
    pub fn split(self) -> (PeerId, WireMessage, QuotaPermit) {
        (self.from, self.message, QuotaPermit(self._quota))
    }
}

/// A peer's inbound-quota permit (NODE-NET-11); released when dropped.
#[derive(Debug)]
pub struct QuotaPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// NODE-NET-11: the node's inbound channel must hold this many messages so
/// that a peer within its quota never waits on another's backlog.
pub fn inbound_queue_len(config: &TransportConfig) -> usize {
    config
        .peers
        .len()
        .max(1)
        .saturating_mul(config.inbound_messages_per_peer)
}

/// What the node service needs from a transport. Sends never block and may
/// be lost.
pub trait Outbound: Send + Sync + 'static {
    fn send(&self, to: PeerId, message: &WireMessage);
    fn broadcast(&self, message: &WireMessage);
    /// To every peer but `except` (NODE-GOSSIP-3: it has the message).
    fn broadcast_except(&self, except: PeerId, message: &WireMessage);
    /// Peers with an open outgoing connection.
    fn connected_peers(&self) -> usize;
    /// What the transport refused or dropped (NODE-NET-7), if it counts.
    fn counters(&self) -> Option<Arc<NetCounters>> {
        None
    }
    /// NODE-ADMIT-1..4: admit and dial the peers the committed chain names.
    fn apply_plan(&self, _plan: &PeerPlan) {}
    /// NODE-ADMIT-5: `message` to every dialled peer that is not a validator.
    fn push_to_followers(&self, _message: &WireMessage) {}
}

/// A configured peer (a seed, NODE-ADMIT-3).
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

/// Transport parameters (defaults in [`TransportConfig::new`]).
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub chain_id: String,
    /// The only nodes admitted by the TLS handshake and whose frames are
    /// accepted, and the peers dialled (the seed list of the configuration).
    pub peers: Vec<Peer>,
    /// Messages queued per peer before new ones are dropped (default 16384:
    /// a few seconds of gossiped transactions under load).
    pub outbound_queue_messages: usize,
    /// Established (authenticated) inbound connections at once, all peers
    /// together (default 64). Only admitted peers can hold one (NODE-NET-6a).
    pub max_inbound_connections: usize,
    /// Established inbound connections one validator may hold (default 4:
    /// one is normal; a few cover reconnects and blob fetches).
    pub max_connections_per_peer: usize,
    /// NODE-NET-6d: a TLS handshake not finished in this time is dropped
    /// (default 3000 ms).
    pub handshake_timeout_ms: u64,
    /// NODE-NET-6a/c: unauthenticated connections (TLS handshakes in flight)
    /// at once; when full, a new one evicts the oldest (default 64).
    pub max_pending_handshakes: usize,
    /// NODE-NET-6b: handshakes in flight from one source address (an IPv6
    /// /64 counts as one); more are refused at once (default 4).
    pub max_handshakes_per_source: usize,
    /// NODE-NET-11: messages of one peer in the node's inbound queue (and
    /// its gossip backlog) at once; beyond it that peer's own stream waits
    /// (default 1024).
    pub inbound_messages_per_peer: usize,
    /// What the transport refused or dropped, for `/metrics` (NODE-NET-7).
    pub counters: Arc<NetCounters>,
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
            max_connections_per_peer: 4,
            handshake_timeout_ms: 3_000,
            max_pending_handshakes: 64,
            max_handshakes_per_source: 4,
            inbound_messages_per_peer: 1_024,
            counters: Arc::new(NetCounters::default()),
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
        }
    }
}

/// NODE-NET-7: everything the transport refuses or drops is counted (and
/// exported by `/metrics`), never lost silently.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// TLS handshakes that failed: unknown, unbound or missing certificates,
    /// garbage, timeouts.
    pub handshakes_failed: AtomicU64,
    /// NODE-NET-6b: connections refused because their source had too many
    /// handshakes in flight.
    pub handshakes_refused_source: AtomicU64,
    /// NODE-NET-6c: handshakes ended to make room for a newer one.
    pub handshakes_evicted: AtomicU64,
    /// Authenticated connections refused: all slots or the peer's slots taken.
    pub connections_refused_slots: AtomicU64,
    /// Frames refused after a good handshake (bad envelope, wrong sender, stale).
    pub frames_rejected: AtomicU64,
    /// Outgoing messages larger than a frame (never sent).
    pub outbound_too_large: AtomicU64,
    /// Outgoing messages dropped because the peer's queue was full.
    pub outbound_queue_full: AtomicU64,
    /// Batches lost with a peer connection (the protocol retransmits).
    pub outbound_batches_lost: AtomicU64,
    /// NODE-NET-11: times a peer's frame waited because that peer's inbound
    /// quota was used up (its stream is slowed, nobody else's).
    pub inbound_quota_waits: AtomicU64,
    /// NODE-SYNC-6: block requests not served: the peer's byte budget was spent.
    pub sync_serves_throttled: AtomicU64,
    /// RT-HB-10: heartbeats refused by this node's table.
    pub heartbeats_refused: AtomicU64,
}

impl NetCounters {
    /// Prometheus text exposition of the counters.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let rows: [(&str, &str, &AtomicU64); 11] = [
            (
                "blyan_p2p_handshakes_failed_total",
                "Inbound TLS handshakes that failed or timed out.",
                &self.handshakes_failed,
            ),
            (
                "blyan_p2p_handshakes_refused_source_total",
                "Inbound connections refused: too many handshakes from their source (NODE-NET-6b).",
                &self.handshakes_refused_source,
            ),
            (
                "blyan_p2p_handshakes_evicted_total",
                "Inbound handshakes evicted for a newer one (NODE-NET-6c).",
                &self.handshakes_evicted,
            ),
            (
                "blyan_p2p_connections_refused_slots_total",
                "Authenticated inbound connections refused: no slot left.",
                &self.connections_refused_slots,
            ),
            (
                "blyan_p2p_frames_rejected_total",
                "Peer frames refused after the handshake.",
                &self.frames_rejected,
            ),
            (
                "blyan_p2p_outbound_too_large_total",
                "Outgoing messages larger than a frame, not sent.",
                &self.outbound_too_large,
            ),
            (
                "blyan_p2p_outbound_queue_full_total",
                "Outgoing messages dropped on a full peer queue.",
                &self.outbound_queue_full,
            ),
            (
                "blyan_p2p_sync_serves_throttled_total",
                "Block requests not served: the peer's catch-up byte budget was spent (NODE-SYNC-6).",
                &self.sync_serves_throttled,
            ),
            (
                "blyan_p2p_inbound_quota_waits_total",
                "Peer frames that waited on their sender's inbound quota (NODE-NET-11).",
                &self.inbound_quota_waits,
            ),
            (
                "blyan_p2p_outbound_batches_lost_total",
                "Outgoing batches lost with a peer connection.",
                &self.outbound_batches_lost,
            ),
            (
                "blyan_p2p_heartbeats_refused_total",
                "Inference-node heartbeats refused by this node's table (RT-HB-1..6, RT-HB-10).",
                &self.heartbeats_refused,
            ),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        s
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
    open_with(frame, chain_id, now_ms, |pk| peers.get(pk).copied())
}

/// [`open`] with the sender looked up by `peer_of` (NODE-ADMIT-1: the
/// transport derives the address from the key and checks it is admitted).
pub fn open_with(
    frame: &[u8],
    chain_id: &str,
    now_ms: u64,
    peer_of: impl FnOnce(&PublicKey) -> Option<PeerId>,
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
    let Some(from) = peer_of(&public_key) else {
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

/// gRPC service name.
pub const SERVICE_NAME: &str = "blyan.p2p.v1.Peer";
const PATH_DELIVER: &str = "/blyan.p2p.v1.Peer/Deliver";
const PATH_BLOB_MANIFEST: &str = "/blyan.p2p.v1.Peer/BlobManifest";
const PATH_HEARTBEAT: &str = "/blyan.p2p.v1.Peer/Heartbeat";
const PATH_GENERATE: &str = "/blyan.p2p.v1.Peer/Generate";
const PATH_STAGE: &str = "/blyan.p2p.v1.Peer/Stage";
const PATH_EXPERT: &str = "/blyan.p2p.v1.Peer/Expert";
const PATH_BLOB_BY_ROOT: &str = "/blyan.p2p.v1.Peer/BlobByRoot";
const PATH_SNAPSHOT_MANIFEST: &str = "/blyan.p2p.v1.Peer/SnapshotManifest";
const PATH_SNAPSHOT_CHUNK: &str = "/blyan.p2p.v1.Peer/SnapshotChunk";
/// SYNC-*: the largest snapshot manifest or chunk a peer sends or accepts.
pub const MAX_SNAPSHOT_MESSAGE_BYTES: usize = blyan_state_machine::node::snapshot::MAX_CHUNK_BYTES;

/// SYNC-*: what serves peers' snapshot requests (the node's latest
/// snapshot, [`crate::state_sync::Snapshots`]).
pub trait SnapshotSource: Send + Sync + 'static {
    /// The encoded manifest of the latest snapshot, if any.
    fn manifest(&self) -> Option<Bytes>;
    /// Chunk `index` of the snapshot at `height`, if held.
    fn chunk(&self, height: u64, index: u32) -> Option<Bytes>;
}
/// RT-STAGE-1: the largest `Generate` request (a rendered prompt and its
/// settings) and the largest event of its answer stream.
pub const MAX_GENERATE_MESSAGE_BYTES: usize = 1024 * 1024;
/// RT-STAGE-1: events of one `Generate` answer buffered on the serving side
/// before it waits for the router to read.
pub const GENERATE_STREAM_BUFFER: usize = 64;

/// RT-STAGE-1: what serves `Generate` requests (the node's engine,
/// [`crate::router::serve_generate`]): given the TLS peer and the request
/// bytes, a bounded channel of answer events.
pub trait StageSink: Send + Sync + 'static {
    fn generate(&self, from: PeerId, request: Bytes) -> mpsc::Receiver<Result<Bytes, Status>>;
    /// RT-PIPE-1/2: one pipeline session: the router's messages in, the
    /// stage's answers out (bounded).
    fn stage(
        &self,
        from: PeerId,
        requests: tonic::Streaming<Bytes>,
    ) -> mpsc::Receiver<Result<Bytes, Status>>;
    /// RT-PIPE-8: one `Expert` call (the encoded call in, the encoded rows
    /// out).
    fn expert(&self, from: PeerId, request: Bytes) -> oneshot::Receiver<Result<Bytes, Status>>;
}
/// RT-HB-1: the largest heartbeat body (`blyan_route::heartbeat::MAX_HEARTBEAT_BYTES`).
pub const MAX_HEARTBEAT_MESSAGE_BYTES: usize = blyan_route::heartbeat::MAX_HEARTBEAT_BYTES;

/// RT-HB-10: where heartbeats received on the `Heartbeat` method go (the
/// node's table, [`crate::heartbeats::Heartbeats`]). `from` is the
/// TLS-authenticated peer.
pub trait HeartbeatSink: Send + Sync + 'static {
    fn heartbeat(&self, from: PeerId, body: &[u8]) -> Result<(), String>;
}

/// What this node measured of its frames to one dialled peer (NODE-NET-7):
/// round trips of `Deliver` calls and how many were delivered or lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Exponentially weighted mean (weight 1/8) of the round trip, µs.
    pub rtt_us: Option<u64>,
    pub delivered: u64,
    pub failed: u64,
}

impl PeerStats {
    fn delivered_in(&mut self, rtt: Duration) {
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.rtt_us = Some(match self.rtt_us {
            None => us,
            Some(old) => old - old / 8 + us / 8,
        });
        self.delivered += 1;
    }
}

/// Every dialled peer's [`PeerStats`], shared with the heartbeat table.
pub type PeerStatsMap = Arc<Mutex<BTreeMap<PeerId, PeerStats>>>;
const PATH_FETCH_BLOB: &str = "/blyan.p2p.v1.Peer/FetchBlob";

/// The gRPC codec of this service: messages are raw bytes, their layout
/// defined by each method (module docs), so no protobuf is involved.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> BytesCodec {
        BytesCodec
    }
    fn decoder(&mut self) -> BytesCodec {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The validator at the other end of an inbound connection, as proven by its
/// TLS certificate; tonic attaches it to every request on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsPeer(pub PeerId);

/// An authenticated inbound connection. Holding it holds its slot in the
/// inbound-connection and per-peer limits.
struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerId,
    _permit: OwnedSemaphorePermit,
    _slot: PeerSlot,
}

/// One of a peer's [`TransportConfig::max_connections_per_peer`] slots.
struct PeerSlot {
    peer: PeerId,
    counts: Arc<Mutex<BTreeMap<PeerId, usize>>>,
}

impl PeerSlot {
    fn take(
        counts: &Arc<Mutex<BTreeMap<PeerId, usize>>>,
        peer: PeerId,
        max: usize,
    ) -> Option<PeerSlot> {
        let mut c = counts.lock().expect("peer slot lock");
        let n = c.entry(peer).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peer,
            counts: counts.clone(),
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("peer slot lock");
        if let Some(n) = c.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = TlsPeer;
    fn connect_info(&self) -> TlsPeer {
        TlsPeer(self.peer)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the server side shares between connections and calls.
struct Shared {
    chain_id: String,
    /// NODE-ADMIT-1: whose frames are accepted.
    admitted: Admitted,
    inbound: mpsc::Sender<Inbound>,
    blocked: Arc<RwLock<BTreeSet<PeerId>>>,
    blobs: Option<Arc<BlobStore>>,
    counters: Arc<NetCounters>,
    /// NODE-NET-11: each admitted peer's inbound quota, made on its first
    /// frame and forgotten when it leaves the admitted set.
    quotas: Mutex<BTreeMap<PeerId, Arc<Semaphore>>>,
    quota_messages: usize,
    /// RT-HB-10: `None` until the node sets its table.
    heartbeats: RwLock<Option<Arc<dyn HeartbeatSink>>>,
    /// RT-STAGE-1: `None` on a node that serves no engine to peers.
    stages: RwLock<Option<Arc<dyn StageSink>>>,
    /// SYNC-*: `None` until the node serves snapshots.
    snapshots: RwLock<Option<Arc<dyn SnapshotSource>>>,
}

impl Shared {
    fn is_blocked(&self, peer: &PeerId) -> bool {
        self.blocked.read().expect("blocked lock").contains(peer)
    }

    fn quota(&self, peer: PeerId) -> Arc<Semaphore> {
        self.quotas
            .lock()
            .expect("quotas lock")
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.quota_messages)))
            .clone()
    }
}

fn tls_peer<T>(r: &tonic::Request<T>) -> Result<PeerId, Status> {
    r.extensions()
        .get::<TlsPeer>()
        .map(|p| p.0)
        .ok_or_else(|| Status::unauthenticated("no TLS peer identity on this connection"))
}

/// The gRPC status a refused frame is answered with.
fn frame_status(e: &Error) -> Status {
    match e {
        Error::StaleFrame { .. } => Status::failed_precondition(e.to_string()),
        Error::UnknownPeer(_) | Error::SenderMismatch { .. } | Error::BadFrameSignature => {
            Status::permission_denied(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

async fn deliver(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let tls = tls_peer(&r)?;
    if shared.is_blocked(&tls) {
        debug!(peer = %tls, "frame from a blocked peer dropped");
        return Ok(tonic::Response::new(Bytes::new()));
    }
    let frame = r.into_inner();
    // NODE-ADMIT-1: the signer's address, if the node admits it now (a peer
    // that left the admitted set has its frames refused from the next one).
    let admitted = |pk: &PublicKey| Address::from_sec1(pk).filter(|a| shared.admitted.contains(a));
    let checked = open_with(&frame, &shared.chain_id, now_ms(), admitted).and_then(|(from, m)| {
        if from == tls {
            Ok(m)
        } else {
            Err(Error::SenderMismatch {
                envelope: from.to_string(),
                tls: tls.to_string(),
            })
        }
    });
    match checked {
        Ok(messages) => {
            let quota = shared.quota(tls);
            for m in messages {
                let permit = match quota.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        shared
                            .counters
                            .inbound_quota_waits
                            .fetch_add(1, Ordering::Relaxed);
                        quota
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| Status::unavailable("the node is stopping"))?
                    }
                };
                let item = Inbound {
                    from: tls,
                    message: m,
                    _quota: Some(permit),
                };
                if shared.inbound.send(item).await.is_err() {
                    return Err(Status::unavailable("the node is stopping"));
                }
            }
            Ok(tonic::Response::new(Bytes::new()))
        }
        Err(e) => {
            shared
                .counters
                .frames_rejected
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %tls, error = %e, "peer frame refused");
            Err(frame_status(&e))
        }
    }
}

fn parse_blob_id(bytes: &[u8]) -> Result<BlobId, Status> {
    let id: [u8; 32] = bytes
        .get(..32)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Status::invalid_argument("a blob id is 32 bytes"))?;
    Ok(BlobId(id))
}

fn blob_store(shared: &Shared) -> Result<Arc<BlobStore>, Status> {
    shared
        .blobs
        .clone()
        .ok_or_else(|| Status::unimplemented("this node serves no blobs"))
}

async fn blob_manifest(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    tls_peer(&r)?;
    let body = r.into_inner();
    if body.len() != 32 {
        return Err(Status::invalid_argument("a blob id is 32 bytes"));
    }
    let id = parse_blob_id(&body)?;
    let store = blob_store(&shared)?;
    let m = tokio::task::spawn_blocking(move || store.manifest(&id))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
    match m {
        Some(m) => Ok(tonic::Response::new(Bytes::from(m.encode()))),
        None => Err(Status::not_found(format!("blob {id}"))),
    }
}

/// NODE-NET-12: the id of the blob whose PoL payload root is the request.
async fn blob_by_root(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    tls_peer(&r)?;
    let body = r.into_inner();
    let root: [u8; 32] = body
        .as_ref()
        .try_into()
        .map_err(|_| Status::invalid_argument("a payload root is 32 bytes"))?;
    let store = blob_store(&shared)?;
    let id = tokio::task::spawn_blocking(move || store.by_pol_root(&root))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
    match id {
        Some(id) => Ok(tonic::Response::new(Bytes::copy_from_slice(&id.0))),
        None => Err(Status::not_found("no payload with this root")),
    }
}

/// RT-HB-10: a heartbeat from the TLS peer, handed to the node's table.
/// SYNC-*: the latest snapshot's manifest (request body empty).
async fn snapshot_manifest(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let from = tls_peer(&r)?;
    if shared.is_blocked(&from) {
        return Err(Status::permission_denied("blocked"));
    }
    let source = shared
        .snapshots
        .read()
        .expect("snapshot source lock")
        .clone();
    source
        .and_then(|s| s.manifest())
        .map(tonic::Response::new)
        .ok_or_else(|| Status::not_found("no snapshot held"))
}

/// SYNC-*: one chunk; the body is the height (u64) and index (u32), big-endian.
async fn snapshot_chunk(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let from = tls_peer(&r)?;
    if shared.is_blocked(&from) {
        return Err(Status::permission_denied("blocked"));
    }
    let body = r.into_inner();
    if body.len() != 12 {
        return Err(Status::invalid_argument(
            "expected height (8 bytes) and index (4 bytes)",
        ));
    }
    let height = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
    let index = u32::from_be_bytes(body[8..].try_into().expect("4 bytes"));
    let source = shared
        .snapshots
        .read()
        .expect("snapshot source lock")
        .clone();
    source
        .and_then(|s| s.chunk(height, index))
        .map(tonic::Response::new)
        .ok_or_else(|| Status::not_found(format!("no chunk {index} of a snapshot at {height}")))
}

async fn heartbeat(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let from = tls_peer(&r)?;
    if shared.is_blocked(&from) {
        return Ok(tonic::Response::new(Bytes::new()));
    }
    let sink = shared
        .heartbeats
        .read()
        .expect("heartbeat sink lock")
        .clone()
        .ok_or_else(|| Status::unavailable("this node keeps no heartbeat table yet"))?;
    let body = r.into_inner();
    sink.heartbeat(from, &body).map_err(|e| {
        shared
            .counters
            .heartbeats_refused
            .fetch_add(1, Ordering::Relaxed);
        debug!(peer = %from, error = %e, "heartbeat refused");
        Status::invalid_argument(e)
    })?;
    Ok(tonic::Response::new(Bytes::new()))
}

type ChunkStream = tokio_stream::wrappers::ReceiverStream<Result<Bytes, Status>>;

/// RT-STAGE-1, RT-PIPE-1: the TLS peer of an inference call and this
/// node's engine, if it serves one to that peer.
fn stage_sink<T>(
    shared: &Shared,
    r: &tonic::Request<T>,
) -> Result<(PeerId, Arc<dyn StageSink>), Status> {
    let from = tls_peer(r)?;
    if shared.is_blocked(&from) {
        return Err(Status::unavailable("partitioned"));
    }
    let sink = shared
        .stages
        .read()
        .expect("stage sink lock")
        .clone()
        .ok_or_else(|| Status::unimplemented("this node serves no engine to peers"))?;
    Ok((from, sink))
}

/// RT-STAGE-1: a generation for the TLS peer, streamed back as events.
async fn generate_stream(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<ChunkStream>, Status> {
    let (from, sink) = stage_sink(&shared, &r)?;
    let rx = sink.generate(from, r.into_inner());
    Ok(tonic::Response::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// RT-PIPE-8: an expert call for the TLS peer.
async fn expert_call(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let (from, sink) = stage_sink(&shared, &r)?;
    let answer = sink.expert(from, r.into_inner());
    answer
        .await
        .map_err(|_| Status::unavailable("the expert call was dropped"))?
        .map(tonic::Response::new)
}

/// RT-PIPE-1: a pipeline session for the TLS peer.
async fn stage_stream(
    shared: Arc<Shared>,
    r: tonic::Request<tonic::Streaming<Bytes>>,
) -> Result<tonic::Response<ChunkStream>, Status> {
    let (from, sink) = stage_sink(&shared, &r)?;
    let rx = sink.stage(from, r.into_inner());
    Ok(tonic::Response::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

async fn fetch_blob_stream(
    shared: Arc<Shared>,
    r: tonic::Request<Bytes>,
) -> Result<tonic::Response<ChunkStream>, Status> {
    tls_peer(&r)?;
    let body = r.into_inner();
    if body.len() != 36 {
        return Err(Status::invalid_argument(
            "FetchBlob takes a blob id and a chunk index (36 bytes)",
        ));
    }
    let id = parse_blob_id(&body)?;
    let from = u32::from_be_bytes(body[32..36].try_into().expect("4 bytes"));
    let store = blob_store(&shared)?;
    let (tx, rx) = mpsc::channel(BLOB_STREAM_BUFFER_CHUNKS);
    tokio::spawn(
        async move {
            let mut index = from;
            loop {
                let s = store.clone();
                let chunk = tokio::task::spawn_blocking(move || s.get_chunk(&id, index)).await;
                let item = match chunk {
                    Ok(Ok(Some(c))) => {
                        let mut m = Vec::with_capacity(4 + c.len());
                        m.extend_from_slice(&index.to_be_bytes());
                        m.extend_from_slice(&c);
                        Ok(Bytes::from(m))
                    }
                    Ok(Ok(None)) if index == from => {
                        Err(Status::not_found(format!("blob {id} chunk {index}")))
                    }
                    Ok(Ok(None)) => return, // Past the last chunk (or not held): the stream ends.
                    Ok(Err(e)) => {
                        warn!(error = %e, "blob chunk not served");
                        Err(Status::data_loss(e.to_string()))
                    }
                    Err(e) => Err(Status::internal(e.to_string())),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return; // The client went away, or an error ended the stream.
                }
                index += 1;
            }
        }
        .in_current_span(),
    );
    Ok(tonic::Response::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// The hand-written gRPC service (what code generation would produce).
#[derive(Clone)]
struct PeerService {
    shared: Arc<Shared>,
}

impl tonic::server::NamedService for PeerService {
    const NAME: &'static str = SERVICE_NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<tonic::body::Body>> for PeerService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        match req.uri().path() {
            PATH_DELIVER => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .accept_compressed(CompressionEncoding::Gzip)
                    .max_decoding_message_size(MAX_FRAME_BYTES + COMPRESSION_SLACK_BYTES);
                let svc = tower::service_fn(move |r| deliver(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_BLOB_MANIFEST => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(64)
                    .send_compressed(CompressionEncoding::Gzip);
                let svc = tower::service_fn(move |r| blob_manifest(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_BLOB_BY_ROOT => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec).max_decoding_message_size(64);
                let svc = tower::service_fn(move |r| blob_by_root(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_SNAPSHOT_MANIFEST => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(16)
                    .max_encoding_message_size(MAX_SNAPSHOT_MESSAGE_BYTES)
                    .send_compressed(CompressionEncoding::Gzip);
                let svc = tower::service_fn(move |r| snapshot_manifest(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_SNAPSHOT_CHUNK => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(16)
                    .max_encoding_message_size(MAX_SNAPSHOT_MESSAGE_BYTES)
                    .send_compressed(CompressionEncoding::Gzip);
                let svc = tower::service_fn(move |r| snapshot_chunk(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_HEARTBEAT => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(MAX_HEARTBEAT_MESSAGE_BYTES);
                let svc = tower::service_fn(move |r| heartbeat(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_GENERATE => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(MAX_GENERATE_MESSAGE_BYTES);
                let svc = tower::service_fn(move |r| generate_stream(shared.clone(), r));
                Ok(grpc.server_streaming(svc, req).await)
            }),
            PATH_STAGE => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(crate::pipeline::MAX_STAGE_MESSAGE_BYTES)
                    .max_encoding_message_size(crate::pipeline::MAX_STAGE_MESSAGE_BYTES);
                let svc = tower::service_fn(move |r| stage_stream(shared.clone(), r));
                Ok(grpc.streaming(svc, req).await)
            }),
            PATH_EXPERT => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(crate::experts::MAX_EXPERT_MESSAGE_BYTES)
                    .max_encoding_message_size(crate::experts::MAX_EXPERT_MESSAGE_BYTES);
                let svc = tower::service_fn(move |r| expert_call(shared.clone(), r));
                Ok(grpc.unary(svc, req).await)
            }),
            PATH_FETCH_BLOB => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(BytesCodec)
                    .max_decoding_message_size(64)
                    .send_compressed(CompressionEncoding::Gzip);
                let svc = tower::service_fn(move |r| fetch_blob_stream(shared.clone(), r));
                Ok(grpc.server_streaming(svc, req).await)
            }),
            other => {
                let status = Status::unimplemented(format!("no method {other}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A gRPC client for one peer over an authenticated TLS connection: what
/// the writer tasks and blob fetches use, public for tests and tools.
#[derive(Clone)]
pub struct PeerClient {
    channel: Channel,
}

impl PeerClient {
    /// Dials `addr`, presenting `cert` (none: only tests), and accepts only a
    /// server whose certificate proves it is `expected`.
    pub async fn connect(
        addr: &str,
        cert: Option<&NodeCertificate>,
        verifier: Arc<PeerCertVerifier>,
        chain_id: &str,
        allowed: &BTreeSet<PeerId>,
        expected: PeerId,
    ) -> Result<PeerClient, Error> {
        let config = Arc::new(crate::tls::client_config(cert, verifier)?);
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Config(format!("peer address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES)
            .keep_alive_while_idle(true);
        let (addr, chain_id, allowed) = (addr.to_string(), chain_id.to_string(), allowed.clone());
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let (addr, chain_id, allowed, config) = (
                addr.clone(),
                chain_id.clone(),
                allowed.clone(),
                config.clone(),
            );
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
                    .map_err(std::io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                let id = peer_identity(tls.get_ref().1.peer_certificates(), &chain_id, &allowed)
                    .map_err(std::io::Error::other)?;
                if id != expected {
                    return Err(std::io::Error::other(format!(
                        "dialled {expected} at {addr}, reached {id}"
                    )));
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| Error::Rpc(format!("connect {expected}: {}", error_chain(&e))))?;
        Ok(PeerClient { channel })
    }

    fn grpc(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel.clone())
    }

    async fn ready(grpc: &mut tonic::client::Grpc<Channel>) -> Result<(), Status> {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection: {}", error_chain(&e))))
    }

    /// Delivers one frame body (a [`seal`] output without its length prefix),
    /// gzip compressed from [`GZIP_THRESHOLD_BYTES`] on.
    pub async fn deliver(&self, frame: Bytes) -> Result<(), Status> {
        let mut grpc = self
            .grpc()
            .max_encoding_message_size(MAX_FRAME_BYTES + COMPRESSION_SLACK_BYTES);
        if frame.len() >= GZIP_THRESHOLD_BYTES {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        Self::ready(&mut grpc).await?;
        let path = http::uri::PathAndQuery::from_static(PATH_DELIVER);
        grpc.unary(tonic::Request::new(frame), path, BytesCodec)
            .await
            .map(|_| ())
    }

    /// The peer's manifest of blob `id`.
    /// RT-STAGE-1: asks the peer to generate; its answer events as a stream.
    pub async fn generate(&self, request: Bytes) -> Result<tonic::Streaming<Bytes>, Status> {
        let mut grpc = self
            .grpc()
            .max_encoding_message_size(MAX_GENERATE_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_GENERATE_MESSAGE_BYTES);
        Self::ready(&mut grpc).await?;
        let path = http::uri::PathAndQuery::from_static(PATH_GENERATE);
        grpc.server_streaming(tonic::Request::new(request), path, BytesCodec)
            .await
            .map(|r| r.into_inner())
    }

    /// RT-PIPE-1: opens a pipeline session; `requests` feeds the router's
    /// messages, the stream returned carries the stage's answers.
    pub async fn stage(
        &self,
        requests: mpsc::Receiver<Bytes>,
    ) -> Result<tonic::Streaming<Bytes>, Status> {
        let mut grpc = self
            .grpc()
            .max_encoding_message_size(crate::pipeline::MAX_STAGE_MESSAGE_BYTES)
            .max_decoding_message_size(crate::pipeline::MAX_STAGE_MESSAGE_BYTES);
        Self::ready(&mut grpc).await?;
        let path = http::uri::PathAndQuery::from_static(PATH_STAGE);
        let stream = tokio_stream::wrappers::ReceiverStream::new(requests);
        grpc.streaming(tonic::Request::new(stream), path, BytesCodec)
            .await
            .map(|r| r.into_inner())
    }

    /// RT-PIPE-8: one expert call (an encoded `ExpertCall`); the encoded
    /// rows it answers.
    pub async fn expert(&self, call: Bytes) -> Result<Bytes, Status> {
        let mut grpc = self
            .grpc()
            .max_encoding_message_size(crate::experts::MAX_EXPERT_MESSAGE_BYTES)
            .max_decoding_message_size(crate::experts::MAX_EXPERT_MESSAGE_BYTES);
        Self::ready(&mut grpc).await?;
        let path = http::uri::PathAndQuery::from_static(PATH_EXPERT);
        grpc.unary(tonic::Request::new(call), path, BytesCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// RT-HB-10: sends one signed heartbeat (its encoded bytes).
    pub async fn heartbeat(&self, body: Bytes) -> Result<(), Status> {
        let mut grpc = self
            .grpc()
            .max_encoding_message_size(MAX_HEARTBEAT_MESSAGE_BYTES);
        Self::ready(&mut grpc).await?;
        let path = http::uri::PathAndQuery::from_static(PATH_HEARTBEAT);
        grpc.unary(tonic::Request::new(body), path, BytesCodec)
            .await
            .map(|_| ())
    }

    /// SYNC-*: the peer's latest snapshot manifest (bytes, unchecked), or
    /// `None` if it holds none.
    pub async fn snapshot_manifest(&self) -> Result<Option<Bytes>, Error> {
        self.snapshot_call(PATH_SNAPSHOT_MANIFEST, Bytes::new())
            .await
    }

    /// SYNC-*: chunk `index` of the peer's snapshot at `height` (unchecked).
    pub async fn snapshot_chunk(&self, height: u64, index: u32) -> Result<Option<Bytes>, Error> {
        let mut body = height.to_be_bytes().to_vec();
        body.extend_from_slice(&index.to_be_bytes());
        self.snapshot_call(PATH_SNAPSHOT_CHUNK, Bytes::from(body))
            .await
    }

    async fn snapshot_call(&self, path: &'static str, body: Bytes) -> Result<Option<Bytes>, Error> {
        let mut grpc = self
            .grpc()
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_SNAPSHOT_MESSAGE_BYTES);
        Self::ready(&mut grpc).await.map_err(rpc)?;
        let path = http::uri::PathAndQuery::from_static(path);
        match grpc
            .unary(tonic::Request::new(body), path, BytesCodec)
            .await
        {
            Ok(m) => Ok(Some(m.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc(s)),
        }
    }

    pub async fn blob_manifest(&self, id: &BlobId) -> Result<BlobManifest, Error> {
        let mut grpc = self
            .grpc()
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_MANIFEST_MESSAGE_BYTES);
        Self::ready(&mut grpc).await.map_err(rpc)?;
        let path = http::uri::PathAndQuery::from_static(PATH_BLOB_MANIFEST);
        let r = grpc
            .unary(
                tonic::Request::new(Bytes::copy_from_slice(&id.0)),
                path,
                BytesCodec,
            )
            .await;
        match r {
            Ok(m) => BlobManifest::decode(&m.into_inner()),
            Err(s) if s.code() == Code::NotFound => Err(Error::BlobUnavailable(id.to_string())),
            Err(s) => Err(rpc(s)),
        }
    }

    /// NODE-NET-12: the peer's blob whose PoL payload root is `root`, if any.
    pub async fn blob_by_root(&self, root: &[u8; 32]) -> Result<Option<BlobId>, Error> {
        let mut grpc = self.grpc().max_decoding_message_size(64);
        Self::ready(&mut grpc).await.map_err(rpc)?;
        let path = http::uri::PathAndQuery::from_static(PATH_BLOB_BY_ROOT);
        let r = grpc
            .unary(
                tonic::Request::new(Bytes::copy_from_slice(root)),
                path,
                BytesCodec,
            )
            .await;
        match r {
            Ok(m) => Ok(Some(parse_blob_id(&m.into_inner()).map_err(rpc)?)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc(s)),
        }
    }

    /// The peer's chunks of blob `id` from `from_chunk` on, as `(index, bytes)`.
    pub async fn fetch_blob(
        &self,
        id: &BlobId,
        from_chunk: u32,
    ) -> Result<tonic::Streaming<Bytes>, Error> {
        let mut grpc = self
            .grpc()
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_CHUNK_MESSAGE_BYTES);
        Self::ready(&mut grpc).await.map_err(rpc)?;
        let mut req = id.0.to_vec();
        req.extend_from_slice(&from_chunk.to_be_bytes());
        let path = http::uri::PathAndQuery::from_static(PATH_FETCH_BLOB);
        grpc.server_streaming(tonic::Request::new(Bytes::from(req)), path, BytesCodec)
            .await
            .map(|r| r.into_inner())
            .map_err(rpc)
    }
}

fn rpc(s: Status) -> Error {
    Error::Rpc(format!("{:?}: {}", s.code(), s.message()))
}

/// An error and its sources, joined: tonic's transport errors say little
/// on their own ("transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// How far a [`GrpcTransport::fetch_blob`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchProgress {
    /// Chunks received and stored by this call.
    pub received_chunks: u32,
    /// The first chunk asked for (the first one missing).
    pub from_chunk: u32,
    /// Whether the blob is now complete and verified.
    pub complete: bool,
}

/// The gRPC transport. See the module docs.
pub struct GrpcTransport {
    key: SigningKey,
    config: TransportConfig,
    cert: NodeCertificate,
    verifier: Arc<PeerCertVerifier>,
    /// NODE-ADMIT-1: seeds at start, then the chain's plan after each commit.
    admitted: Admitted,
    /// NODE-ADMIT-3: one writer (task and bounded queue) per dialled peer.
    writers: RwLock<BTreeMap<PeerId, Writer>>,
    /// NODE-ADMIT-4: consensus messages go to these only; `None` until the
    /// first plan (then every dialled peer).
    validators: RwLock<Option<BTreeSet<PeerId>>>,
    /// NODE-ADMIT-5: dialled peers that are not validators.
    followers: RwLock<BTreeSet<PeerId>>,
    connected: Arc<AtomicUsize>,
    blocked: Arc<RwLock<BTreeSet<PeerId>>>,
    shared: Arc<Shared>,
    /// Closed (its sender dropped) when the node's tasks are aborted: every
    /// writer task ends with it.
    stopped: watch::Receiver<()>,
    /// The runtime writers run on (the one that started the transport, not
    /// the node task's own thread, NODE-HOST-2).
    runtime: tokio::runtime::Handle,
    /// Frame round trips and deliveries per dialled peer.
    stats: PeerStatsMap,
    /// RT-HB-11: one client per peer heartbeats are sent to (reconnected
    /// after a failure).
    heartbeat_clients: Mutex<BTreeMap<PeerId, PeerClient>>,
}

/// A dialled peer's writer: where it dials and its send queue (dropping the
/// queue's sender ends the task).
struct Writer {
    addr: String,
    queue: mpsc::Sender<Outgoing>,
}

impl GrpcTransport {
    /// Starts serving on `listener` (frames delivered to `inbound`, blobs
    /// served from `blobs`) and a writer task per configured peer other than
    /// this node; the node's tasks go into `tasks` (aborting them stops the
    /// writers too). [`GrpcTransport::apply_plan`] later admits and dials the
    /// peers the chain names.
    pub fn start(
        listener: TcpListener,
        key: SigningKey,
        config: TransportConfig,
        inbound: mpsc::Sender<Inbound>,
        blobs: Option<Arc<BlobStore>>,
        tasks: &mut JoinSet<()>,
    ) -> Result<Arc<GrpcTransport>, Error> {
        let me = public_key_of(&key);
        let mut seeds = BTreeMap::new();
        for p in &config.peers {
            let id = p.id().ok_or_else(|| {
                Error::Config(format!("peer {} has an invalid public key", p.addr))
            })?;
            if p.public_key != me {
                seeds.insert(id, p.addr.clone());
            }
        }
        let admitted = Admitted::new(config.peers.iter().filter_map(Peer::id).collect());
        let verifier = Arc::new(PeerCertVerifier::shared(
            config.chain_id.clone(),
            admitted.clone(),
        ));
        let cert = NodeCertificate::generate(&key, &config.chain_id)?;
        let server_tls = Arc::new(crate::tls::server_config(&cert, verifier.clone())?);
        let blocked = Arc::new(RwLock::new(BTreeSet::new()));
        let shared = Arc::new(Shared {
            chain_id: config.chain_id.clone(),
            admitted: admitted.clone(),
            inbound,
            blocked: blocked.clone(),
            blobs,
            counters: config.counters.clone(),
            quotas: Mutex::new(BTreeMap::new()),
            quota_messages: config.inbound_messages_per_peer,
            heartbeats: RwLock::new(None),
            stages: RwLock::new(None),
            snapshots: RwLock::new(None),
        });
        let (stop_tx, stopped) = watch::channel(());
        // Holds the writers' stop signal for as long as the node's tasks run.
        tasks.spawn(async move {
            let _stop = stop_tx;
            std::future::pending::<()>().await
        });
        let connected = Arc::new(AtomicUsize::new(0));
        let transport = GrpcTransport {
            key,
            config,
            cert,
            verifier,
            admitted: admitted.clone(),
            writers: RwLock::new(BTreeMap::new()),
            validators: RwLock::new(None),
            followers: RwLock::new(BTreeSet::new()),
            connected,
            blocked,
            shared: shared.clone(),
            stopped,
            runtime: tokio::runtime::Handle::current(),
            stats: Arc::new(Mutex::new(BTreeMap::new())),
            heartbeat_clients: Mutex::new(BTreeMap::new()),
        };
        transport.set_dialled(&seeds);
        let (conn_tx, conn_rx) = mpsc::channel::<Result<PeerStream, std::io::Error>>(16);
        tasks.spawn(
            accept_loop(
                listener,
                tokio_rustls::TlsAcceptor::from(server_tls),
                AcceptLimits {
                    connections: Arc::new(Semaphore::new(transport.config.max_inbound_connections)),
                    per_peer: Arc::new(Mutex::new(BTreeMap::new())),
                    max_per_peer: transport.config.max_connections_per_peer,
                    handshake_timeout_ms: transport.config.handshake_timeout_ms,
                    handshakes: Arc::new(Mutex::new(HandshakeBudget::new(
                        transport.config.max_pending_handshakes,
                        transport.config.max_handshakes_per_source,
                    ))),
                    handshake_tasks: Arc::new(Mutex::new(BTreeMap::new())),
                },
                transport.config.chain_id.clone(),
                admitted,
                transport.config.counters.clone(),
                conn_tx,
            )
            .in_current_span(),
        );
        let service = PeerService { shared };
        let rpc_span = tracing::Span::current();
        tasks.spawn(
            async move {
                let served = tonic::transport::Server::builder()
                    .trace_fn(move |_| rpc_span.clone())
                    .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                    .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
                    .http2_max_header_list_size(16 * 1024)
                    .http2_keepalive_interval(Some(Duration::from_secs(20)))
                    .initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES)
                    .add_service(service)
                    // A shutdown signal that never fires: with one, tonic ties
                    // each connection task to this server, so aborting this task
                    // (the node stopping) closes its connections; without one
                    // they would outlive it.
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::ReceiverStream::new(conn_rx),
                        std::future::pending::<()>(),
                    )
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %error_chain(&e), "P2P server failed");
                }
            }
            .in_current_span(),
        );
        Ok(Arc::new(transport))
    }

    /// NODE-ADMIT-1..5: applies the plan the chain gives after a commit:
    /// the admitted set (handshakes and frames from now on), the dialled
    /// peers (writers started for new ones or a changed address, stopped for
    /// peers no longer dialled) and who receives consensus messages.
    pub fn apply_plan(&self, plan: &PeerPlan) {
        if self.admitted.with(|a| a != &plan.admitted) {
            info!(admitted = plan.admitted.len(), "P2P admitted set changed");
            self.admitted.replace(plan.admitted.clone());
            self.shared
                .quotas
                .lock()
                .expect("quotas lock")
                .retain(|p, _| plan.admitted.contains(p));
        }
        self.set_dialled(&plan.dialled);
        *self.validators.write().expect("validators lock") = Some(plan.validators.clone());
        *self.followers.write().expect("followers lock") = plan.followers().copied().collect();
    }

    /// Starts a writer for each peer of `dialled` without one (or whose
    /// address changed) and drops the writers of the others.
    fn set_dialled(&self, dialled: &BTreeMap<PeerId, String>) {
        let mut writers = self.writers.write().expect("writers lock");
        writers.retain(|id, w| dialled.get(id) == Some(&w.addr));
        self.stats
            .lock()
            .expect("peer stats lock")
            .retain(|id, _| dialled.contains_key(id));
        self.heartbeat_clients
            .lock()
            .expect("heartbeat clients lock")
            .retain(|id, _| writers.contains_key(id));
        for (id, addr) in dialled {
            if writers.contains_key(id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(self.config.outbound_queue_messages);
            let mut stopped = self.stopped.clone();
            let task = write_loop(self.dialer(addr, *id), rx, self.connected.clone());
            // OPS-LOG-2: the caller's (node) span follows every task.
            self.runtime.spawn(
                async move {
                    tokio::select! {
                        _ = stopped.changed() => {}
                        () = task => {}
                    }
                }
                .in_current_span(),
            );
            writers.insert(
                *id,
                Writer {
                    addr: addr.clone(),
                    queue: tx,
                },
            );
        }
    }

    /// Nodes admitted now (NODE-ADMIT-1).
    pub fn admitted(&self) -> BTreeSet<PeerId> {
        self.admitted.snapshot()
    }

    /// Peers dialled now (NODE-ADMIT-3), in address order.
    pub fn dialled_peers(&self) -> Vec<PeerId> {
        self.writers
            .read()
            .expect("writers lock")
            .keys()
            .copied()
            .collect()
    }

    /// What this node measured of its frames to each dialled peer.
    pub fn peer_stats(&self) -> PeerStatsMap {
        self.stats.clone()
    }

    /// RT-STAGE-1: what serves peers' `Generate` requests from now on.
    pub fn set_stage_sink(&self, sink: Arc<dyn StageSink>) {
        *self.shared.stages.write().expect("stage sink lock") = Some(sink);
    }

    /// RT-STAGE-1: a client for dialled peer `to` (the heartbeat client,
    /// connected on first use).
    pub async fn client(&self, to: PeerId) -> Result<PeerClient, Error> {
        let cached = self
            .heartbeat_clients
            .lock()
            .expect("heartbeat clients lock")
            .get(&to)
            .cloned();
        if let Some(c) = cached {
            return Ok(c);
        }
        let addr = self
            .writers
            .read()
            .expect("writers lock")
            .get(&to)
            .map(|w| w.addr.clone())
            .ok_or_else(|| Error::UnknownPeer(to.to_string()))?;
        let c = self.dialer(&addr, to).connect().await?;
        self.heartbeat_clients
            .lock()
            .expect("heartbeat clients lock")
            .insert(to, c.clone());
        Ok(c)
    }

    /// Forgets the cached client of `to` (after a connection failure).
    pub fn forget_client(&self, to: &PeerId) {
        self.heartbeat_clients
            .lock()
            .expect("heartbeat clients lock")
            .remove(to);
    }

    /// RT-HB-10: where received heartbeats go from now on.
    /// SYNC-*: what serves peers' snapshot requests from now on.
    pub fn set_snapshot_source(&self, source: Arc<dyn SnapshotSource>) {
        *self.shared.snapshots.write().expect("snapshot source lock") = Some(source);
    }

    pub fn set_heartbeat_sink(&self, sink: Arc<dyn HeartbeatSink>) {
        *self.shared.heartbeats.write().expect("heartbeat sink lock") = Some(sink);
    }

    /// RT-HB-11: sends `body` (a signed heartbeat) to dialled peer `to`.
    pub async fn send_heartbeat(&self, to: PeerId, body: Bytes) -> Result<(), Error> {
        let client = self.client(to).await?;
        let sent = client.heartbeat(body).await;
        if sent.as_ref().is_err_and(is_connection_failure) {
            self.forget_client(&to);
        }
        sent.map_err(rpc)
    }

    fn dialer(&self, addr: &str, peer: PeerId) -> Dialer {
        Dialer {
            addr: addr.to_string(),
            peer,
            cert: self.cert.clone(),
            verifier: self.verifier.clone(),
            chain_id: self.config.chain_id.clone(),
            allowed: self.admitted.clone(),
            signer: self.key.clone(),
            blocked: self.blocked.clone(),
            backoff_min_ms: self.config.reconnect_min_ms,
            backoff_max_ms: self.config.reconnect_max_ms,
            counters: self.config.counters.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Test and operations hook: from now on, drop every frame to and from
    /// `peers` (both directions, at this node), until called again. Frames
    /// already queued for a newly blocked peer are dropped as they come up.
    pub fn set_blocked(&self, peers: BTreeSet<PeerId>) {
        info!(blocked = peers.len(), "transport partition set");
        *self.blocked.write().expect("blocked lock") = peers;
    }

    /// TLS handshakes refused so far (unknown, unbound or missing certificates, garbage).
    pub fn rejected_handshakes(&self) -> u64 {
        self.config
            .counters
            .handshakes_failed
            .load(Ordering::Relaxed)
    }

    /// Frames refused so far after a good handshake (bad envelope, wrong sender, stale).
    pub fn rejected_frames(&self) -> u64 {
        self.shared.counters.frames_rejected.load(Ordering::Relaxed)
    }

    /// Fetches blob `id` from peer `from` into `store`, asking from the first
    /// chunk it lacks (so an interrupted fetch resumes), each chunk verified
    /// on receipt; stops after `max_chunks` chunks if given. A chunk that does
    /// not match the manifest ends the fetch with [`Error::BlobChunkRejected`].
    pub async fn fetch_blob(
        &self,
        from: PeerId,
        id: &BlobId,
        store: &Arc<BlobStore>,
        max_chunks: Option<u32>,
    ) -> Result<FetchProgress, Error> {
        let addr = self
            .writers
            .read()
            .expect("writers lock")
            .get(&from)
            .map(|w| w.addr.clone())
            .ok_or_else(|| Error::UnknownPeer(from.to_string()))?;
        let client = self.dialer(&addr, from).connect().await?;
        fetch_blob_with(&client, id, store, max_chunks).await
    }
}

impl GrpcTransport {
    /// NODE-NET-12: the payload whose PoL Merkle root (POL-3) is `root`:
    /// from `store` if it holds it, else from the first peer (in address
    /// order) that has it, fetched chunk by chunk into `store` (each chunk
    /// verified, NODE-NET-8) and checked against `root` before it is
    /// returned. A peer that fails or lies is skipped.
    pub async fn fetch_payload(
        &self,
        root: &[u8; 32],
        store: &Arc<BlobStore>,
    ) -> Result<Vec<u8>, Error> {
        let blocking = |e: tokio::task::JoinError| Error::Node(format!("blob store task: {e}"));
        let read = |id: BlobId| {
            let s = store.clone();
            async move {
                tokio::task::spawn_blocking(move || s.get(&id))
                    .await
                    .map_err(blocking)?
            }
        };
        let (s, r) = (store.clone(), *root);
        if let Some(id) = tokio::task::spawn_blocking(move || s.by_pol_root(&r))
            .await
            .map_err(blocking)??
            && let Some(bytes) = read(id).await?
        {
            return Ok(bytes);
        }
        let peers: Vec<(PeerId, String)> = self
            .writers
            .read()
            .expect("writers lock")
            .iter()
            .map(|(p, w)| (*p, w.addr.clone()))
            .collect();
        let mut last = String::from("no peer is connected");
        for (peer, addr) in peers {
            let attempt = async {
                let client = self.dialer(&addr, peer).connect().await?;
                let Some(id) = client.blob_by_root(root).await? else {
                    return Ok(None);
                };
                fetch_blob_with(&client, &id, store, None).await?;
                let bytes = read(id).await?.ok_or_else(|| {
                    Error::BlobUnavailable(format!("{id} incomplete after the fetch"))
                })?;
                if blyan_state_machine::pol::payload_merkle_root(&bytes) != *root {
                    return Err(Error::BlobUnavailable(format!(
                        "peer {peer} answered blob {id}, whose payload has another root"
                    )));
                }
                Ok::<_, Error>(Some(bytes))
            };
            match attempt.await {
                Ok(Some(bytes)) => return Ok(bytes),
                Ok(None) => last = format!("{peer} has no such payload"),
                Err(e) => last = format!("{peer}: {e}"),
            }
        }
        Err(Error::BlobUnavailable(format!(
            "payload with root {}: not found ({last})",
            hex::encode(root)
        )))
    }
}

/// [`GrpcTransport::fetch_blob`] over an existing client.
pub async fn fetch_blob_with(
    client: &PeerClient,
    id: &BlobId,
    store: &Arc<BlobStore>,
    max_chunks: Option<u32>,
) -> Result<FetchProgress, Error> {
    let blocking = |e: tokio::task::JoinError| Error::Node(format!("blob store task: {e}"));
    let (s, i) = (store.clone(), *id);
    let known = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        Ok((s.has(&i)?, s.manifest(&i)?, s.missing_chunks(&i)?))
    })
    .await
    .map_err(blocking)??;
    let manifest = match known {
        (true, _, _) => {
            return Ok(FetchProgress {
                received_chunks: 0,
                from_chunk: 0,
                complete: true,
            });
        }
        (false, Some(m), _) => m,
        (false, None, _) => client.blob_manifest(id).await?,
    };
    // NODE-NET-8: a manifest must name the blob: a lying peer's is refused
    // before anything of it is kept.
    manifest.verify(id)?;
    let from_chunk = match known.2 {
        Some(missing) => missing.first().copied().unwrap_or(0),
        None => 0,
    };
    let mut progress = FetchProgress {
        received_chunks: 0,
        from_chunk,
        complete: false,
    };
    if manifest.chunk_hashes.is_empty() {
        // An empty blob has no chunks to stream; storing it checks its id.
        let s = store.clone();
        let id = *id;
        let stored = tokio::task::spawn_blocking(move || s.put(&[]))
            .await
            .map_err(blocking)??;
        if stored != id {
            return Err(Error::BlobHashMismatch(id.to_string()));
        }
        progress.complete = true;
        return Ok(progress);
    }
    let mut stream = client.fetch_blob(id, from_chunk).await?;
    let manifest = Arc::new(manifest);
    while max_chunks.is_none_or(|m| progress.received_chunks < m) {
        let Some(message) = stream.message().await.map_err(rpc)? else {
            break;
        };
        if message.len() < 4 {
            return Err(Error::Rpc(
                "blob chunk message shorter than its index".into(),
            ));
        }
        let index = u32::from_be_bytes(message[..4].try_into().expect("4 bytes"));
        let (s, m, i) = (store.clone(), manifest.clone(), *id);
        let complete =
            tokio::task::spawn_blocking(move || s.put_chunk(&i, &m, index, &message[4..]))
                .await
                .map_err(blocking)??;
        progress.received_chunks += 1;
        if complete {
            progress.complete = true;
            break;
        }
    }
    Ok(progress)
}

impl GrpcTransport {
    /// To every connected peer but `except`; NODE-ADMIT-4: proposals,
    /// votes and statuses go to validators only.
    fn broadcast_to(&self, except: Option<PeerId>, message: &WireMessage) {
        let Some(f) = self.encode(message) else {
            return;
        };
        let to: Vec<PeerId> = self
            .writers
            .read()
            .expect("writers lock")
            .keys()
            .copied()
            .filter(|p| Some(*p) != except)
            .collect();
        let consensus = message.consensus_height().is_some();
        let validators = self.validators.read().expect("validators lock");
        for p in &to {
            if consensus && validators.as_ref().is_some_and(|v| !v.contains(p)) {
                continue;
            }
            self.enqueue(p, &f);
        }
    }
}

impl Outbound for GrpcTransport {
    fn send(&self, to: PeerId, message: &WireMessage) {
        if let Some(f) = self.encode(message) {
            self.enqueue(&to, &f);
        }
    }
    fn broadcast(&self, message: &WireMessage) {
        self.broadcast_to(None, message);
    }
    fn broadcast_except(&self, except: PeerId, message: &WireMessage) {
        self.broadcast_to(Some(except), message);
    }
    fn apply_plan(&self, plan: &PeerPlan) {
        GrpcTransport::apply_plan(self, plan);
    }
    fn push_to_followers(&self, message: &WireMessage) {
        let followers: Vec<PeerId> = self
            .followers
            .read()
            .expect("followers lock")
            .iter()
            .copied()
            .collect();
        if followers.is_empty() {
            return;
        }
        if let Some(f) = self.encode(message) {
            for p in &followers {
                self.enqueue(p, &f);
            }
        }
    }
    fn connected_peers(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }
    fn counters(&self) -> Option<Arc<NetCounters>> {
        Some(self.config.counters.clone())
    }
}

impl GrpcTransport {
    fn enqueue(&self, to: &PeerId, message: &Outgoing) {
        if self.blocked.read().expect("blocked lock").contains(to) {
            return;
        }
        if let Some(w) = self.writers.read().expect("writers lock").get(to)
            && w.queue.try_send(message.clone()).is_err()
        {
            self.config
                .counters
                .outbound_queue_full
                .fetch_add(1, Ordering::Relaxed);
            debug!(peer = %to, "outbound queue full or closed; message dropped");
        }
    }

    /// The canonical bytes of `message`, if it fits in a frame alone.
    fn encode(&self, message: &WireMessage) -> Option<Outgoing> {
        let bytes = message.encode();
        if 8 + bytes.len() > MAX_PAYLOAD_BYTES {
            self.config
                .counters
                .outbound_too_large
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                bytes = bytes.len(),
                "outgoing message exceeds the frame limit; dropped"
            );
            return None;
        }
        Some(Outgoing {
            bytes: Arc::new(bytes),
            urgent: !matches!(message, WireMessage::Tx(_)),
        })
    }
}

/// A queued outgoing message: its canonical bytes, and whether it is
/// consensus traffic (proposals, votes, catch-up), which is sent at once;
/// transaction gossip lingers for company ([`BATCH_LINGER`]).
#[derive(Clone)]
struct Outgoing {
    bytes: Arc<Vec<u8>>,
    urgent: bool,
}

/// Everything a writer task needs to reach and sign for one peer.
struct Dialer {
    addr: String,
    peer: PeerId,
    cert: NodeCertificate,
    verifier: Arc<PeerCertVerifier>,
    chain_id: String,
    allowed: Admitted,
    signer: SigningKey,
    blocked: Arc<RwLock<BTreeSet<PeerId>>>,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
    counters: Arc<NetCounters>,
    stats: PeerStatsMap,
}

impl Dialer {
    async fn connect(&self) -> Result<PeerClient, Error> {
        PeerClient::connect(
            &self.addr,
            Some(&self.cert),
            self.verifier.clone(),
            &self.chain_id,
            &self.allowed.snapshot(),
            self.peer,
        )
        .await
    }
}

/// Takes `first` and whatever else is queued, up to [`MAX_BATCH_MESSAGES`]
/// and [`MAX_PAYLOAD_BYTES`]; a message that does not fit is left in `carry`.
/// A frame's messages being collected by a writer.
struct Batch {
    messages: Vec<Arc<Vec<u8>>>,
    payload_bytes: usize,
    urgent: bool,
}

impl Batch {
    fn new(first: Outgoing) -> Batch {
        Batch {
            payload_bytes: 4 + 4 + first.bytes.len(),
            urgent: first.urgent,
            messages: vec![first.bytes],
        }
    }

    /// Adds `m`, or hands it back when the frame is full (count or bytes).
    fn push(&mut self, m: Outgoing) -> Result<(), Outgoing> {
        if self.messages.len() >= MAX_BATCH_MESSAGES
            || self.payload_bytes + 4 + m.bytes.len() > MAX_PAYLOAD_BYTES
        {
            return Err(m);
        }
        self.payload_bytes += 4 + m.bytes.len();
        self.urgent |= m.urgent;
        self.messages.push(m.bytes);
        Ok(())
    }

    /// Takes what is already queued, up to a full frame; an overflowing
    /// message is left in `carry` for the next frame.
    fn fill(&mut self, queue: &mut mpsc::Receiver<Outgoing>, carry: &mut Option<Outgoing>) {
        while let Ok(m) = queue.try_recv() {
            if let Err(m) = self.push(m) {
                *carry = Some(m);
                return;
            }
        }
    }
}

/// The next frame's messages (NODE-NET-5): the carried or next queued
/// message and everything queued behind it. Transaction gossip lingers up
/// to `linger` ([`BATCH_LINGER`]) for more; a consensus message ends the
/// linger, and one that comes first is sent at once. `None` once the queue
/// is closed and empty.
async fn next_batch(
    queue: &mut mpsc::Receiver<Outgoing>,
    carry: &mut Option<Outgoing>,
    linger: Duration,
) -> Option<Batch> {
    let first = match carry.take() {
        Some(m) => m,
        None => queue.recv().await?,
    };
    let mut batch = Batch::new(first);
    batch.fill(queue, carry);
    if !batch.urgent && carry.is_none() {
        let until = tokio::time::Instant::now() + linger;
        while let Ok(Some(m)) = tokio::time::timeout_at(until, queue.recv()).await {
            if let Err(m) = batch.push(m) {
                *carry = Some(m);
                break;
            }
            if batch.urgent {
                break;
            }
        }
        if carry.is_none() {
            batch.fill(queue, carry);
        }
    }
    Some(batch)
}

/// Whether a failed call means the connection is gone (reconnect) rather
/// than that the peer refused this one frame (log and go on).
pub fn is_connection_failure(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

async fn write_loop(
    dialer: Dialer,
    mut queue: mpsc::Receiver<Outgoing>,
    connected: Arc<AtomicUsize>,
) {
    let addr = dialer.addr.clone();
    let mut backoff_ms = dialer.backoff_min_ms;
    let mut carry: Option<Outgoing> = None;
    loop {
        let client = match dialer.connect().await {
            Ok(c) => c,
            Err(e) => {
                debug!(%addr, error = %e, backoff_ms, "connect failed; retrying");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(dialer.backoff_max_ms);
                if queue.is_closed() {
                    return;
                }
                continue;
            }
        };
        info!(%addr, peer = %dialer.peer, "connected to peer (TLS 1.3, gRPC)");
        backoff_ms = dialer.backoff_min_ms;
        connected.fetch_add(1, Ordering::Relaxed);
        let closed = loop {
            let Some(batch) = next_batch(&mut queue, &mut carry, BATCH_LINGER).await else {
                break true;
            };
            let batch = batch.messages;
            if dialer
                .blocked
                .read()
                .expect("blocked lock")
                .contains(&dialer.peer)
            {
                continue; // Partitioned: queued before the block, dropped now.
            }
            let parts: Vec<&[u8]> = batch.iter().map(|m| m.as_slice()).collect();
            let frame = Bytes::from(seal_encoded(
                &dialer.signer,
                &dialer.chain_id,
                now_ms(),
                &parts,
            ))
            .slice(4..);
            let sent_at = std::time::Instant::now();
            let delivered = client.deliver(frame).await;
            {
                let mut stats = dialer.stats.lock().expect("peer stats lock");
                let s = stats.entry(dialer.peer).or_default();
                match &delivered {
                    Ok(()) => s.delivered_in(sent_at.elapsed()),
                    Err(_) => s.failed += 1,
                }
            }
            match delivered {
                Ok(()) => {}
                Err(s) if is_connection_failure(&s) => {
                    dialer
                        .counters
                        .outbound_batches_lost
                        .fetch_add(1, Ordering::Relaxed);
                    info!(%addr, status = %s, messages = batch.len(), "peer connection lost; batch dropped, reconnecting");
                    break false;
                }
                Err(s) => warn!(%addr, status = %s, "peer refused a frame"),
            }
        };
        connected.fetch_sub(1, Ordering::Relaxed);
        if closed {
            return; // The transport was dropped.
        }
    }
}

/// Limits on inbound connections (see [`TransportConfig`] and
/// [`crate::inbound`]).
struct AcceptLimits {
    /// Established (authenticated) connections, taken after the handshake.
    connections: Arc<Semaphore>,
    per_peer: Arc<Mutex<BTreeMap<PeerId, usize>>>,
    max_per_peer: usize,
    handshake_timeout_ms: u64,
    /// NODE-NET-6: the unauthenticated connections' own budget.
    handshakes: Arc<Mutex<HandshakeBudget>>,
    /// Ticket → the task running that handshake (to evict it).
    handshake_tasks: Arc<Mutex<BTreeMap<u64, tokio::task::AbortHandle>>>,
}

/// Ends a handshake's ticket however its task ends (done, failed, timed
/// out, or aborted by an eviction).
struct HandshakeTicket {
    ticket: u64,
    handshakes: Arc<Mutex<HandshakeBudget>>,
    tasks: Arc<Mutex<BTreeMap<u64, tokio::task::AbortHandle>>>,
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.handshakes
            .lock()
            .expect("handshake budget lock")
            .finish(self.ticket);
        self.tasks
            .lock()
            .expect("handshake tasks lock")
            .remove(&self.ticket);
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: AcceptLimits,
    chain_id: String,
    allowed: Admitted,
    counters: Arc<NetCounters>,
    out: mpsc::Sender<Result<PeerStream, std::io::Error>>,
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
        // NODE-NET-6: admit the unauthenticated connection into the
        // handshake budget (the accept loop never waits on a slot).
        let admission = limits
            .handshakes
            .lock()
            .expect("handshake budget lock")
            .admit(remote.ip());
        let (ticket, evict) = match admission {
            Admission::Admit { ticket, evict } => (ticket, evict),
            Admission::RefuseSource => {
                counters
                    .handshakes_refused_source
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%remote, "too many handshakes from this source; refused");
                continue;
            }
        };
        if let Some(old) = evict {
            counters.handshakes_evicted.fetch_add(1, Ordering::Relaxed);
            if let Some(task) = limits
                .handshake_tasks
                .lock()
                .expect("handshake tasks lock")
                .remove(&old)
            {
                task.abort();
            }
            debug!(%remote, "handshake budget full; the oldest handshake evicted");
        }
        let _ = stream.set_nodelay(true);
        let guard = HandshakeTicket {
            ticket,
            handshakes: limits.handshakes.clone(),
            tasks: limits.handshake_tasks.clone(),
        };
        let (acceptor, chain_id, allowed, counters, out) = (
            acceptor.clone(),
            chain_id.clone(),
            allowed.clone(),
            counters.clone(),
            out.clone(),
        );
        let (connections, per_peer, max_per_peer) = (
            limits.connections.clone(),
            limits.per_peer.clone(),
            limits.max_per_peer,
        );
        let timeout = Duration::from_millis(limits.handshake_timeout_ms);
        // The task map's lock is held across the spawn, so the task's own
        // removal (its guard) cannot run before the insertion.
        let mut tasks = limits.handshake_tasks.lock().expect("handshake tasks lock");
        let task = tokio::spawn(
            async move {
                // Moved in whole, so an abort before the first poll still ends
                // the ticket.
                let guard = guard;
                let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        warn!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        debug!(%remote, "TLS handshake timed out; connection dropped");
                        return;
                    }
                };
                // Authenticated or not, the handshake is over: its budget is free.
                drop(guard);
                let identity = allowed.with(|allowed| {
                    peer_identity(tls.get_ref().1.peer_certificates(), &chain_id, allowed)
                });
                let peer = match identity {
                    Ok(p) => p,
                    Err(e) => {
                        counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                        warn!(%remote, error = %e, "TLS peer refused after the handshake");
                        return;
                    }
                };
                let Some(slot) = PeerSlot::take(&per_peer, peer, max_per_peer) else {
                    counters
                        .connections_refused_slots
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, %peer, max_per_peer, "peer holds too many connections; refused");
                    return;
                };
                let Ok(permit) = connections.try_acquire_owned() else {
                    counters
                        .connections_refused_slots
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%remote, %peer, "too many established inbound connections; refused");
                    return;
                };
                debug!(%remote, %peer, "inbound peer connection authenticated");
                let stream = PeerStream {
                    inner: tls,
                    peer,
                    _permit: permit,
                    _slot: slot,
                };
                let _ = out.send(Ok(stream)).await;
            }
            .in_current_span(),
        );
        tasks.insert(ticket, task.abort_handle());
        drop(tasks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, urgent: bool) -> Outgoing {
        Outgoing {
            bytes: Arc::new(vec![tag; 8]),
            urgent,
        }
    }

    fn tags(b: &Batch) -> Vec<u8> {
        b.messages.iter().map(|m| m[0]).collect()
    }

    /// A linger no test could sit out: a batch that comes back at all came
    /// back without waiting it out.
    const FOREVER: Duration = Duration::from_secs(3_600);
    /// Liveness bound of these tests (a hang is a failure, not a slow pass).
    const HANG: Duration = Duration::from_secs(30);

    /// NODE-NET-5: a consensus message first is sent at once, with what is
    /// queued behind it.
    #[tokio::test]
    async fn net_5_a_consensus_message_is_not_lingered() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(msg(1, true)).await.unwrap();
        tx.send(msg(2, false)).await.unwrap();
        let mut carry = None;
        let b = tokio::time::timeout(HANG, next_batch(&mut rx, &mut carry, FOREVER))
            .await
            .expect("an urgent batch does not linger")
            .unwrap();
        assert_eq!(tags(&b), vec![1, 2]);
        assert!(b.urgent && carry.is_none());
    }

    /// NODE-NET-5: gossip lingers and collects what comes later; a consensus
    /// message arriving during the linger ends it and rides along.
    #[tokio::test]
    async fn net_5_gossip_lingers_until_a_consensus_message_comes() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(msg(1, false)).await.unwrap();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(msg(2, false)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(msg(3, true)).await.unwrap();
            tx
        });
        let mut carry = None;
        let b = tokio::time::timeout(HANG, next_batch(&mut rx, &mut carry, FOREVER))
            .await
            .expect("the vote ends the linger")
            .unwrap();
        assert_eq!(tags(&b), vec![1, 2, 3], "later gossip joined the frame");
        assert!(b.urgent);
        drop(sender.await.unwrap());
        assert!(
            next_batch(&mut rx, &mut carry, FOREVER).await.is_none(),
            "closed and empty"
        );
    }

    /// NODE-NET-3: a frame never exceeds the payload limit; the message that
    /// would overflow it is carried into the next frame, first.
    #[tokio::test]
    async fn net_3_an_overflowing_message_is_carried_to_the_next_frame() {
        let big = |tag| Outgoing {
            bytes: Arc::new(vec![tag; MAX_PAYLOAD_BYTES / 2]),
            urgent: true,
        };
        let (tx, mut rx) = mpsc::channel(8);
        for tag in 1..=3 {
            tx.send(big(tag)).await.unwrap();
        }
        drop(tx);
        let mut carry = None;
        let first = next_batch(&mut rx, &mut carry, FOREVER).await.unwrap();
        assert_eq!(tags(&first), vec![1]);
        assert!(first.payload_bytes <= MAX_PAYLOAD_BYTES);
        let second = next_batch(&mut rx, &mut carry, FOREVER).await.unwrap();
        assert_eq!(tags(&second), vec![2]);
        let third = next_batch(&mut rx, &mut carry, FOREVER).await.unwrap();
        assert_eq!(tags(&third), vec![3]);
        assert!(next_batch(&mut rx, &mut carry, FOREVER).await.is_none());
    }
}
