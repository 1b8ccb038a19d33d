//! The runtime's error type: internal failures (IO, corrupt files) kept apart
//! from protocol rejections, which come from the core as `blyan_state_machine::Error`.

/// The crate's one error enum.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wrong password, or the key file was modified (authentication tag mismatch)")]
    WrongPasswordOrTampered,
    #[error("key file is malformed: {0}")]
    KeyFileMalformed(String),
    #[error("key file uses unsupported {what} {found:?}; supported: {supported}")]
    KeyFileUnsupported {
        what: &'static str,
        found: String,
        supported: &'static str,
    },
    #[error("key file iteration count {0} is below the minimum {min}", min = crate::keystore::MIN_ITERATIONS)]
    KeyFileWeakKdf(u32),
    #[error("decrypted key is not a valid secp256k1 secret key")]
    InvalidSecretKey,
    #[error(
        "no key file password: give --password-file FILE or set {env} \
         (--password PASSWORD for scripts), or run on a terminal to be asked"
    )]
    PasswordMissing { env: String },
    #[error("a new key file needs a non-empty password")]
    PasswordEmpty,
    #[error("the passwords typed differ")]
    PasswordMismatch,
    #[error("operating-system randomness unavailable: {0}")]
    Randomness(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("data directory is corrupt: {0}")]
    Corrupt(String),
    #[error("data directory has schema version {found}; this node understands {supported}")]
    UnsupportedSchema { found: u32, supported: u32 },
    #[error("data directory belongs to another chain (genesis hash differs)")]
    GenesisMismatch,
    #[error("genesis: {0}")]
    Genesis(String),
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("node: {0}")]
    Node(String),
    #[error("http: {0}")]
    Http(String),
    // Peer frames (transport.rs). `closes_connection` says which are garbage.
    #[error("peer frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("peer frame is malformed: {0}")]
    FrameMalformed(String),
    #[error("peer frame from unknown sender {0}")]
    UnknownPeer(String),
    #[error("peer frame signature does not verify")]
    BadFrameSignature,
    #[error(
        "peer frame timestamp {timestamp_ms} is more than {max_skew_ms} ms from now ({now_ms})"
    )]
    StaleFrame {
        timestamp_ms: u64,
        now_ms: u64,
        max_skew_ms: u64,
    },
    #[error("peer frame signed by {envelope} arrived on the TLS connection of {tls}")]
    SenderMismatch { envelope: String, tls: String },
    // TLS (tls.rs).
    #[error("tls: {0}")]
    Tls(String),
    #[error("peer certificate refused: {0}")]
    PeerCertificate(String),
    #[error("rpc: {0}")]
    Rpc(String),
    // Blobs (blobs.rs).
    #[error("blob manifest is invalid: {0}")]
    BlobManifestInvalid(String),
    #[error("blob {id} chunk {index} refused: {why}")]
    BlobChunkRejected { id: String, index: u32, why: String },
    #[error("blob {0}: the assembled payload does not hash to its id; its chunks were discarded")]
    BlobHashMismatch(String),
    #[error("blob {id} is corrupt in storage: {what}")]
    BlobCorrupt { id: String, what: String },
    #[error("blob {0} is not available from the peer")]
    BlobUnavailable(String),
    #[error("blob store quota: {0}")]
    BlobQuotaExceeded(String),
    // API services (inference.rs, registry.rs).
    #[error("inference: {0}")]
    Inference(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// API-PAY-1: the caller's allowance cannot pay for the request.
    #[error("payment required: {0}")]
    PaymentRequired(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    // Usage records (usage.rs).
    #[error("usage record refused: {0}")]
    UsageRecordInvalid(String),
    #[error("postgres: {0}")]
    Postgres(String),
}

impl Error {
    /// Peer-frame errors that mean the peer sent garbage, as opposed to a
    /// stale frame (clock skew, a long queue). The gRPC transport answers
    /// both with an error status and keeps the connection (TLS already
    /// proved who the peer is); the distinction is kept for logs and for a
    /// transport that would rather disconnect.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Error::FrameTooLarge { .. }
                | Error::FrameMalformed(_)
                | Error::UnknownPeer(_)
                | Error::BadFrameSignature
                | Error::SenderMismatch { .. }
        )
    }

    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_string(),
            source,
        }
    }
}
