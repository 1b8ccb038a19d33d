//! SIG-*, ENC-1, TYPES-2.
use blyan_state_machine::crypto::{sha3_256, sign, verify_signature};
use blyan_state_machine::testkit::key;
use blyan_state_machine::tx::{Domain, signing_bytes};
use k256::ecdsa::Signature;

#[test]
fn enc_1_sha3_256_is_fips_sha3_not_keccak() {
    assert_eq!(
        hex::encode(sha3_256(b"")),
        "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a"
    );
    assert_eq!(
        hex::encode(sha3_256(b"abc")),
        "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"
    );
}

#[test]
fn sig_2_sign_verify_and_reject_tampering() {
    let k = key(7);
    let pk_c = k.verifying_key().to_encoded_point(true);
    let pk_u = k.verifying_key().to_encoded_point(false);
    let sig = sign(&k, b"hello");
    assert!(verify_signature(pk_c.as_bytes(), b"hello", &sig));
    assert!(verify_signature(pk_u.as_bytes(), b"hello", &sig));
    assert!(!verify_signature(pk_c.as_bytes(), b"hellp", &sig));
    let mut bad = sig;
    bad[10] ^= 1;
    assert!(!verify_signature(pk_c.as_bytes(), b"hello", &bad));
    // Malformed keys never panic.
    assert!(!verify_signature(&[], b"hello", &sig));
    assert!(!verify_signature(&[2u8; 33], b"hello", &sig));
    assert!(!verify_signature(&pk_c.as_bytes()[..32], b"hello", &sig));
    assert!(!verify_signature(&[0u8; 64], b"hello", &sig));
    assert!(!verify_signature(pk_c.as_bytes(), b"hello", &[0u8; 64]));
    assert!(!verify_signature(pk_c.as_bytes(), b"hello", &[0xffu8; 64]));
}

#[test]
fn sig_2_high_s_rejected() {
    let k = key(8);
    let pk = k.verifying_key().to_encoded_point(true);
    let sig = sign(&k, b"m");
    let parsed = Signature::from_slice(&sig).unwrap();
    // s' = n - s is the high-S twin of the same signature.
    let (r, s) = parsed.split_scalars();
    let high = Signature::from_scalars(r, -*s).unwrap();
    let high_bytes: [u8; 64] = high.to_bytes().into();
    assert_ne!(high_bytes, sig);
    assert!(!verify_signature(pk.as_bytes(), b"m", &high_bytes));
}

#[test]
fn sig_1_domains_are_distinct_and_bind_the_chain() {
    let all = [
        Domain::Transaction,
        Domain::Vote,
        Domain::Proposal,
        Domain::Receipt,
        Domain::PeerMessage,
        Domain::VrfInput,
        Domain::NodeAnnouncement,
        Domain::ApiKey,
        Domain::Heartbeat,
        Domain::StageCommitment,
        Domain::FaultRecord,
    ];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a.tag(), b.tag());
        }
    }
    let k = key(9);
    let pk = k.verifying_key().to_encoded_point(true);
    let msg = signing_bytes(Domain::Transaction, "chain-a", b"body");
    let sig = sign(&k, &msg);
    assert!(verify_signature(pk.as_bytes(), &msg, &sig));
    let other_chain = signing_bytes(Domain::Transaction, "chain-b", b"body");
    let other_role = signing_bytes(Domain::Vote, "chain-a", b"body");
    assert!(!verify_signature(pk.as_bytes(), &other_chain, &sig));
    assert!(!verify_signature(pk.as_bytes(), &other_role, &sig));
}

/// Minimal strict DER parser for `SEQUENCE { INTEGER r, INTEGER s }`.
/// Returns `None` for anything that is not minimal DER or whose integers do
/// not fit 32 bytes (those cannot be expressed as `r ‖ s`).
fn der_to_rs(der: &[u8]) -> Option<[u8; 64]> {
    fn int(b: &[u8]) -> Option<(&[u8], &[u8])> {
        if b.len() < 2 || b[0] != 0x02 || b[1] >= 0x80 {
            return None;
        }
        let len = b[1] as usize;
        let v = b.get(2..2 + len)?;
        if v.is_empty() || v[0] & 0x80 != 0 || (v.len() > 1 && v[0] == 0 && v[1] & 0x80 == 0) {
            return None;
        }
        Some((v, &b[2 + len..]))
    }
    if der.len() < 2 || der[0] != 0x30 || der[1] >= 0x80 || der[1] as usize != der.len() - 2 {
        return None;
    }
    let (r, rest) = int(&der[2..])?;
    let (s, rest) = int(rest)?;
    if !rest.is_empty() {
        return None;
    }
    let mut out = [0u8; 64];
    for (v, off) in [(r, 0usize), (s, 32usize)] {
        let v = if v.len() == 33 && v[0] == 0 {
            &v[1..]
        } else {
            v
        };
        if v.len() > 32 {
            return None;
        }
        out[off + 32 - v.len()..off + 32].copy_from_slice(v);
    }
    Some(out)
}

/// Wycheproof ECDSA secp256k1/SHA3-256. Mapping (spec/encoding.md SIG-3):
/// DER is parsed strictly; a vector that is not minimal DER, or whose r or s
/// does not fit 32 bytes, has no `r ‖ s` form and must be one Wycheproof
/// expects to fail. Otherwise `verify_signature` must accept exactly the valid
/// vectors with low S; valid high-S vectors are rejected by our policy.
#[test]
fn sig_3_wycheproof_secp256k1_sha3_256() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/ecdsa_secp256k1_sha3_256_test.json"
    );
    let text = std::fs::read_to_string(path).expect("wycheproof vectors in tests/vectors");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let half_n =
        hex::decode("7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0").unwrap();
    let (mut checked, mut valid_accepted, mut high_s_rejected, mut not_rs) = (0, 0, 0, 0);
    for group in doc["testGroups"].as_array().unwrap() {
        let pk = hex::decode(group["publicKey"]["uncompressed"].as_str().unwrap()).unwrap();
        for t in group["tests"].as_array().unwrap() {
            let msg = hex::decode(t["msg"].as_str().unwrap()).unwrap();
            let der = hex::decode(t["sig"].as_str().unwrap()).unwrap();
            let expected_valid = t["result"] == "valid";
            let id = t["tcId"].as_u64().unwrap();
            checked += 1;
            let Some(rs) = der_to_rs(&der) else {
                assert!(!expected_valid, "tcId {id}: valid vector has no r‖s form");
                not_rs += 1;
                continue;
            };
            let high_s = rs[32..] > half_n[..];
            let got = verify_signature(&pk, &msg, &rs);
            if expected_valid && high_s {
                assert!(!got, "tcId {id}: high-S must be rejected");
                high_s_rejected += 1;
            } else {
                assert_eq!(got, expected_valid, "tcId {id}: {}", t["comment"]);
                valid_accepted += usize::from(got);
            }
        }
    }
    assert_eq!(checked, 474);
    assert!(
        valid_accepted > 50 && high_s_rejected > 20 && not_rs > 50,
        "{valid_accepted} {high_s_rejected} {not_rs}"
    );
}
