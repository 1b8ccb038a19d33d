//! Mutual TLS 1.3 for the P2P transport, with each side's certificate bound
//! to its secp256k1 node key (spec NODE-NET-1).
//!
//! TLS 1.3 has no secp256k1 signature scheme, so a node cannot put its node
//! key in a certificate directly. As in libp2p's TLS handshake, each node
//! instead generates an ephemeral TLS key (ECDSA P-256) at start-up and a
//! self-signed certificate for it that carries one extra extension
//! ([`NODE_KEY_EXTENSION_OID`]) proving that the node key vouches
//! for the TLS key:
//!
//! ```text
//! extnValue = SEQUENCE {
//!     OCTET STRING (33)  node public key, SEC1 compressed
//!     OCTET STRING (64)  signature r ‖ s
//! }
//! signature = SIG-2 signature by the node key over SIG-1 signing bytes
//!             tag "blyan/tls-cert/1" ‖ len(chain_id) ‖ chain_id ‖ SPKI
//! ```
//!
//! where SPKI is the DER `SubjectPublicKeyInfo` of the certificate's TLS
//! key. The tag is 16 bytes and differs from every `Domain` tag, so such a
//! signature is valid in no other role (a transaction, vote or peer frame)
//! and on no other chain. The extension is marked non-critical only because
//! webpki (which rustls uses to load a node's own certificate) refuses
//! unknown critical extensions; Blyan's verifier requires it all the same.
//!
//! Verification (the same on both sides, [`PeerCertVerifier`]): exactly one
//! certificate; it parses; it is inside its validity window; its
//! self-signature verifies; the extension is present, well formed, and its
//! signature verifies against the certificate's own SPKI; the node address
//! derived from the carried key is in the configured peer set (and, when
//! dialling, is the peer dialled). rustls then checks the TLS 1.3
//! `CertificateVerify` signature with the certificate's key (ring provider),
//! which proves the peer holds the TLS key right now. Together: the peer
//! holds a TLS key its node key signed for this chain. Any failure aborts
//! the handshake with a log line naming the reason; the node keeps running.
//!
//! The OID is `2.999.7353.1`, under `2.999` (the joint ISO/ITU-T example
//! arc, which no registry assigns to anyone): only Blyan nodes read it, and
//! it should move to a registered private-enterprise arc before a public
//! network exists. (A UUID arc under `2.25` was the alternative, but rcgen
//! takes OID arcs as `u64` and a UUID is 128 bits.)

use crate::Error;
use blyan_state_machine::crypto::{sign, verify_signature};
use blyan_state_machine::node::PeerId;
use blyan_state_machine::tx::{PublicKey, public_key_of};
use blyan_state_machine::types::Address;
use k256::ecdsa::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::BTreeSet;
use std::sync::Arc;
use tracing::warn;

/// OID of the node-key extension: 2.999.7353.1 (see the module docs).
pub const NODE_KEY_EXTENSION_OID: [u64; 4] = [2, 999, 7353, 1];
/// [`NODE_KEY_EXTENSION_OID`] as DER content octets (X.690: `2·40 + 999`,
/// then each arc in base 128). The verifier compares these bytes: asn1-rs
/// decodes a first arc of 2 with a large second arc wrongly.
pub const NODE_KEY_EXTENSION_OID_DER: [u8; 5] = [0x88, 0x37, 0xB9, 0x39, 0x01];
/// SIG-1 domain tag of the extension's signature (16 bytes, distinct from
/// every `Domain` tag).
pub const TLS_CERT_TAG: &[u8; 16] = b"blyan/tls-cert/1";
/// The server name a client asks for; certificates carry no names (the
/// identity is the node key), so this is never checked.
pub const SERVER_NAME: &str = "blyan-peer";

/// The bytes the node key signs for the certificate's TLS key.
pub fn cert_signing_bytes(chain_id: &str, spki_der: &[u8]) -> Vec<u8> {
    assert!(chain_id.len() <= 255, "chain id checked at genesis");
    let mut out = Vec::with_capacity(16 + 1 + chain_id.len() + spki_der.len());
    out.extend_from_slice(TLS_CERT_TAG);
    out.push(chain_id.len() as u8);
    out.extend_from_slice(chain_id.as_bytes());
    out.extend_from_slice(spki_der);
    out
}

/// DER of the extension value: `SEQUENCE { OCTET STRING key, OCTET STRING sig }`.
pub fn encode_extension(public_key: &PublicKey, signature: &[u8; 64]) -> Vec<u8> {
    let mut out = vec![0x30, 2 + 33 + 2 + 64, 0x04, 33];
    out.extend_from_slice(public_key);
    out.extend_from_slice(&[0x04, 64]);
    out.extend_from_slice(signature);
    out
}

/// Strict inverse of [`encode_extension`] (the lengths are fixed, so the
/// DER has exactly one form).
pub fn decode_extension(value: &[u8]) -> Result<(PublicKey, [u8; 64]), Error> {
    let bad = || Error::PeerCertificate("node-key extension is malformed".into());
    if value.len() != 2 + 2 + 33 + 2 + 64
        || value[..4] != [0x30, 2 + 33 + 2 + 64, 0x04, 33]
        || value[37..39] != [0x04, 64]
    {
        return Err(bad());
    }
    let key: PublicKey = value[4..37].try_into().map_err(|_| bad())?;
    let sig: [u8; 64] = value[39..].try_into().map_err(|_| bad())?;
    Ok((key, sig))
}

/// A TLS certificate and its private key, ready for rustls.
pub struct NodeCertificate {
    pub cert: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Clone for NodeCertificate {
    fn clone(&self) -> Self {
        NodeCertificate {
            cert: self.cert.clone(),
            key_der: self.key_der.clone(),
        }
    }
}

impl NodeCertificate {
    /// A fresh TLS key and a self-signed certificate for it, vouched for by
    /// `node_key` on `chain_id`.
    pub fn generate(node_key: &SigningKey, chain_id: &str) -> Result<NodeCertificate, Error> {
        NodeCertificate::generate_with(node_key, chain_id, None)
    }

    /// As [`NodeCertificate::generate`], but the node key signs
    /// `signed_spki` instead of the certificate's own key when given: a
    /// certificate whose binding is wrong, for tests of the verifier.
    pub fn generate_with(
        node_key: &SigningKey,
        chain_id: &str,
        signed_spki: Option<&[u8]>,
    ) -> Result<NodeCertificate, Error> {
        let tls = |e: rcgen::Error| Error::Tls(format!("certificate generation: {e}"));
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(tls)?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key_pair);
        let signature = sign(
            node_key,
            &cert_signing_bytes(chain_id, signed_spki.unwrap_or(&spki)),
        );
        let ext = rcgen::CustomExtension::from_oid_content(
            &NODE_KEY_EXTENSION_OID,
            encode_extension(&public_key_of(node_key), &signature),
        );
        let mut params = rcgen::CertificateParams::default();
        params.custom_extensions.push(ext);
        let cert = params.self_signed(&key_pair).map_err(tls)?;
        Ok(NodeCertificate {
            cert: cert.der().clone(),
            key_der: key_pair.serialize_der(),
        })
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }
}

/// Checks a peer's certificate as the module docs describe (everything but
/// the `CertificateVerify` signature, which rustls checks after), returning
/// the node's address. `now_s` is seconds since the Unix epoch.
pub fn verify_certificate(
    der: &[u8],
    chain_id: &str,
    allowed: &BTreeSet<PeerId>,
    now_s: u64,
) -> Result<PeerId, Error> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |m: String| Error::PeerCertificate(m);
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| bad(format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the certificate", rest.len())));
    }
    let now = x509_parser::time::ASN1Time::from_timestamp(now_s as i64)
        .map_err(|e| bad(format!("clock: {e}")))?;
    if !cert.validity().is_valid_at(now) {
        return Err(bad("outside its validity window".into()));
    }
    cert.verify_signature(None)
        .map_err(|e| bad(format!("self-signature does not verify: {e}")))?;
    let mut found = None;
    for ext in cert.extensions() {
        if ext.oid.as_bytes() == NODE_KEY_EXTENSION_OID_DER {
            if found.is_some() {
                return Err(bad("node-key extension appears twice".into()));
            }
            found = Some(ext.value);
        }
    }
    let value = found.ok_or_else(|| bad("no node-key extension".into()))?;
    let (public_key, signature) = decode_extension(value)?;
    let address = Address::from_sec1(&public_key)
        .ok_or_else(|| bad("node key is not a secp256k1 point".into()))?;
    let spki = cert.public_key().raw;
    if !verify_signature(&public_key, &cert_signing_bytes(chain_id, spki), &signature) {
        return Err(bad(format!(
            "node key {address} did not sign this certificate's TLS key for chain {chain_id:?}"
        )));
    }
    if !allowed.contains(&address) {
        return Err(bad(format!("node {address} is not in the peer set")));
    }
    Ok(address)
}

fn now_s(now: UnixTime) -> u64 {
    now.as_secs()
}

fn schemes(provider: &CryptoProvider) -> &WebPkiSupportedAlgorithms {
    &provider.signature_verification_algorithms
}

/// NODE-ADMIT-1: the nodes a handshake admits, shared by the verifier, the
/// accept loop, the writers and frame checks, and replaced by the transport
/// after every commit ([`crate::admission::PeerPlan`]).
#[derive(Clone, Debug, Default)]
pub struct Admitted(Arc<std::sync::RwLock<BTreeSet<PeerId>>>);

impl Admitted {
    pub fn new(set: BTreeSet<PeerId>) -> Admitted {
        Admitted(Arc::new(std::sync::RwLock::new(set)))
    }
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0.read().expect("admitted lock").contains(peer)
    }
    /// A copy of the set as it is now.
    pub fn snapshot(&self) -> BTreeSet<PeerId> {
        self.0.read().expect("admitted lock").clone()
    }
    pub fn len(&self) -> usize {
        self.0.read().expect("admitted lock").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn replace(&self, set: BTreeSet<PeerId>) {
        *self.0.write().expect("admitted lock") = set;
    }
    /// `f` over the set as it is now (the lock held only for the call).
    pub fn with<T>(&self, f: impl FnOnce(&BTreeSet<PeerId>) -> T) -> T {
        f(&self.0.read().expect("admitted lock"))
    }
}

/// The verifier for both directions (see the module docs).
#[derive(Debug)]
pub struct PeerCertVerifier {
    chain_id: String,
    allowed: Admitted,
    provider: Arc<CryptoProvider>,
}

impl PeerCertVerifier {
    /// A verifier admitting exactly `allowed`.
    pub fn new(chain_id: String, allowed: BTreeSet<PeerId>) -> PeerCertVerifier {
        PeerCertVerifier::shared(chain_id, Admitted::new(allowed))
    }

    /// A verifier admitting whatever `allowed` holds at each handshake.
    pub fn shared(chain_id: String, allowed: Admitted) -> PeerCertVerifier {
        PeerCertVerifier {
            chain_id,
            allowed,
            provider: provider(),
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<PeerId, rustls::Error> {
        let result = if intermediates.is_empty() {
            self.allowed
                .with(|allowed| verify_certificate(end_entity, &self.chain_id, allowed, now_s(now)))
        } else {
            Err(Error::PeerCertificate(format!(
                "{} intermediate certificates; a peer sends exactly one self-signed certificate",
                intermediates.len()
            )))
        };
        result.map_err(|e| {
            warn!(error = %e, "TLS peer refused");
            rustls::Error::General(e.to_string())
        })
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, schemes(&self.provider))
    }
}

/// The handshake-signature half of both verifier traits (identical for the
/// two sides): TLS 1.2 refused, TLS 1.3 checked with the ring provider.
macro_rules! handshake_signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.tls13(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            schemes(&self.provider).supported_schemes()
        }
    };
}

impl ServerCertVerifier for PeerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }
    handshake_signature_methods!();
}

impl ClientCertVerifier for PeerCertVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }
    handshake_signature_methods!();
}

/// The ring provider (never aws-lc), shared by every configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN protocol: HTTP/2, the only thing spoken over these connections.
const ALPN_H2: &[u8] = b"h2";

/// Server side: TLS 1.3 only, client certificate mandatory.
pub fn server_config(
    cert: &NodeCertificate,
    verifier: Arc<PeerCertVerifier>,
) -> Result<rustls::ServerConfig, Error> {
    let tls = |e: rustls::Error| Error::Tls(format!("server configuration: {e}"));
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.cert.clone()], cert.private_key())
        .map_err(tls)?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(c)
}

/// Client side: TLS 1.3 only, presenting `cert`; `cert = None` presents no
/// certificate (only tests want that: the server refuses it).
pub fn client_config(
    cert: Option<&NodeCertificate>,
    verifier: Arc<PeerCertVerifier>,
) -> Result<rustls::ClientConfig, Error> {
    let tls = |e: rustls::Error| Error::Tls(format!("client configuration: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut c = match cert {
        Some(cert) => builder
            .with_client_auth_cert(vec![cert.cert.clone()], cert.private_key())
            .map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(c)
}

/// The node address behind a completed handshake's peer certificate
/// (re-derived: rustls' verifier cannot hand it over).
pub fn peer_identity(
    certs: Option<&[CertificateDer<'static>]>,
    chain_id: &str,
    allowed: &BTreeSet<PeerId>,
) -> Result<PeerId, Error> {
    match certs {
        Some([cert]) => {
            verify_certificate(cert, chain_id, allowed, crate::transport::now_ms() / 1000)
        }
        _ => Err(Error::PeerCertificate(
            "the peer presented no single certificate".into(),
        )),
    }
}
