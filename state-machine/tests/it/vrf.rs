//! CONS-VRF-*: the ECVRF against RFC 9381's published P-256 vectors, and the
//! pinned secp256k1 vectors (`tests/vectors/vrf_secp256k1.json`).
//!
//! Regenerate the secp256k1 file (a deliberate act, explained in the commit):
//! `BLYAN_REGEN_VRF_VECTORS=1 cargo test -p blyan-state-machine --test it vrf::`.

use blyan_state_machine::consensus::vrf::{
    self, Secp256k1Sha256Tai, Suite, VrfError, encode_to_curve,
};
use blyan_state_machine::consensus::{genesis_seed, ticket_input};
use blyan_state_machine::testkit;
use serde::{Deserialize, Serialize};

/// RFC 9381 §5.5 `ECVRF-P256-SHA256-TAI`: the generic code instantiated with
/// p256 from outside the crate, for the RFC's vectors only (CONS-VRF-3).
struct P256Sha256Tai;

impl Suite for P256Sha256Tai {
    type Curve = p256::NistP256;
    const SUITE_STRING: u8 = 0x01;
    const NAME: &'static str = "ECVRF-P256-SHA256-TAI";
}

struct RfcVector {
    example: u32,
    sk: &'static str,
    pk: &'static str,
    alpha: &'static [u8],
    /// The intermediate `H` (encode_to_curve output) the RFC lists.
    h: &'static str,
    pi: &'static str,
    beta: &'static str,
}

/// RFC 9381 Appendix B.1, Examples 10, 11 and 12 (ECVRF-P256-SHA256-TAI).
const RFC_9381_P256: [RfcVector; 3] = [
    RfcVector {
        example: 10,
        sk: "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721",
        pk: "0360fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6",
        alpha: b"sample",
        h: "0272a877532e9ac193aff4401234266f59900a4a9e3fc3cfc6a4b7e467a15d06d4",
        pi: concat!(
            "035b5c726e8c0e2c488a107c600578ee75cb702343c153cb1eb8dec77f4b5071b4",
            "a53f0a46f018bc2c56e58d383f2305e0",
            "975972c26feea0eb122fe7893c15af376b33edf7de17c6ea056d4d82de6bc02f",
        ),
        beta: "a3ad7b0ef73d8fc6655053ea22f9bede8c743f08bbed3d38821f0e16474b505e",
    },
    RfcVector {
        example: 11,
        sk: "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721",
        pk: "0360fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6",
        alpha: b"test",
        h: "02173119b4fff5e6f8afed4868a29fe8920f1b54c2cf89cc7b301d0d473de6b974",
        pi: concat!(
            "034dac60aba508ba0c01aa9be80377ebd7562c4a52d74722e0abae7dc3080ddb56",
            "c19e067b15a8a8174905b13617804534",
            "214f935b94c2287f797e393eb0816969d864f37625b443f30f1a5a33f2b3c854",
        ),
        beta: "a284f94ceec2ff4b3794629da7cbafa49121972671b466cab4ce170aa365f26d",
    },
    RfcVector {
        example: 12,
        sk: "2ca1411a41b17b24cc8c3b089cfd033f1920202a6c0de8abb97df1498d50d2c8",
        pk: "03596375e6ce57e0f20294fc46bdfcfd19a39f8161b58695b3ec5b3d16427c274d",
        alpha: b"Example using ECDSA key from Appendix L.4.2 of ANSI.X9-62-2005",
        h: "0258055c26c4b01d01c00fb57567955f7d39cd6f6e85fd37c58f696cc6b7aa761d",
        pi: concat!(
            "03d03398bf53aa23831d7d1b2937e005fb0062cbefa06796579f2a1fc7e7b8c667",
            "d091c00b0f5c3619d10ecea44363b5a5",
            "99cadc5b2957e223fec62e81f7b4825fc799a771a3d7334b9186bdbee87316b1",
        ),
        beta: "90871e06da5caa39a3c61578ebb844de8635e27ac0b13e829997d0d95dd98c19",
    },
];

fn sk32(hex_str: &str) -> [u8; 32] {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

#[test]
fn cons_vrf_3_rfc_9381_p256_prove_matches_byte_for_byte() {
    for v in &RFC_9381_P256 {
        let sk = sk32(v.sk);
        let pk = vrf::public_key::<P256Sha256Tai>(&sk).unwrap();
        assert_eq!(hex::encode(pk), v.pk, "example {} PK", v.example);
        let h = encode_to_curve::<P256Sha256Tai>(&pk, v.alpha).unwrap();
        assert_eq!(hex::encode(h), v.h, "example {} H", v.example);
        let pi = vrf::prove::<P256Sha256Tai>(&sk, v.alpha).unwrap();
        assert_eq!(hex::encode(pi), v.pi, "example {} pi", v.example);
        let beta = vrf::proof_to_hash::<P256Sha256Tai>(&pi).unwrap();
        assert_eq!(hex::encode(beta), v.beta, "example {} beta", v.example);
    }
}

#[test]
fn cons_vrf_2_rfc_9381_p256_verify_accepts_and_rejects() {
    for v in &RFC_9381_P256 {
        let pk = hex::decode(v.pk).unwrap();
        let pi = hex::decode(v.pi).unwrap();
        let beta = vrf::verify::<P256Sha256Tai>(&pk, v.alpha, &pi).unwrap();
        assert_eq!(hex::encode(beta), v.beta, "example {}", v.example);
        // Tampered proof: one bit in each of Gamma, c and s.
        for byte in [5, 40, 70] {
            let mut bad = pi.clone();
            bad[byte] ^= 0x80;
            assert!(
                vrf::verify::<P256Sha256Tai>(&pk, v.alpha, &bad).is_err(),
                "example {} byte {byte}",
                v.example
            );
        }
        // Wrong input.
        let mut alpha = v.alpha.to_vec();
        alpha.push(b'!');
        assert_eq!(
            vrf::verify::<P256Sha256Tai>(&pk, &alpha, &pi),
            Err(VrfError::InvalidProof)
        );
        // Wrong key: another example's key.
        let other = RFC_9381_P256.iter().find(|o| o.pk != v.pk).unwrap();
        let other_pk = hex::decode(other.pk).unwrap();
        assert_eq!(
            vrf::verify::<P256Sha256Tai>(&other_pk, v.alpha, &pi),
            Err(VrfError::InvalidProof)
        );
        // The same proof under the secp256k1 suite means nothing.
        assert!(vrf::verify::<Secp256k1Sha256Tai>(&pk, v.alpha, &pi).is_err());
    }
}

/// The file `tests/vectors/vrf_secp256k1.json`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct VectorFile {
    suite: String,
    suite_string: String,
    comment: String,
    vectors: Vec<Vector>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Vector {
    comment: String,
    sk: String,
    pk: String,
    alpha: String,
    pi: String,
    beta: String,
}

const VECTORS_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/vrf_secp256k1.json"
);

/// The (comment, secret key, alpha) cases the pinned vectors cover.
fn secp256k1_cases() -> Vec<(String, [u8; 32], Vec<u8>)> {
    let one = {
        let mut one = [0u8; 32];
        one[31] = 1;
        one
    };
    // q − 1, the largest secret key.
    let q_minus_1 = sk32("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364140");
    let rfc_sk = sk32("c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721");
    let testkit_0: [u8; 32] = testkit::key(0).to_bytes().into();
    let testkit_1: [u8; 32] = testkit::key(1).to_bytes().into();
    let ticket = ticket_input("blyan-test", 1, &genesis_seed(&[0u8; 32]));
    vec![
        ("sk = 1, empty alpha".into(), one, vec![]),
        ("sk = 1, alpha = \"sample\"".into(), one, b"sample".to_vec()),
        ("sk = q - 1, empty alpha".into(), q_minus_1, vec![]),
        ("sk = q - 1, alpha = 0x00".into(), q_minus_1, vec![0]),
        (
            "RFC 9381 example 10's key, empty alpha".into(),
            rfc_sk,
            vec![],
        ),
        (
            "RFC 9381 example 10's key, alpha = \"sample\"".into(),
            rfc_sk,
            b"sample".to_vec(),
        ),
        (
            "RFC 9381 example 11's key, alpha = \"test\"".into(),
            rfc_sk,
            b"test".to_vec(),
        ),
        ("testkit::key(0), empty alpha".into(), testkit_0, vec![]),
        (
            "testkit::key(0), 1000 bytes 0xab".into(),
            testkit_0,
            vec![0xab; 1000],
        ),
        (
            "testkit::key(1), ticket_input(\"blyan-test\", 1, genesis_seed(0^32)) (CONS-COMM-3)"
                .into(),
            testkit_1,
            ticket,
        ),
    ]
}

fn generate() -> VectorFile {
    let vectors = secp256k1_cases()
        .into_iter()
        .map(|(comment, sk, alpha)| {
            let pk = vrf::public_key::<Secp256k1Sha256Tai>(&sk).unwrap();
            let pi = vrf::prove::<Secp256k1Sha256Tai>(&sk, &alpha).unwrap();
            let beta = vrf::proof_to_hash::<Secp256k1Sha256Tai>(&pi).unwrap();
            Vector {
                comment,
                sk: hex::encode(sk),
                pk: hex::encode(pk),
                alpha: hex::encode(alpha),
                pi: hex::encode(pi),
                beta: hex::encode(beta),
            }
        })
        .collect();
    VectorFile {
        suite: Secp256k1Sha256Tai::NAME.into(),
        suite_string: format!("{:02x}", Secp256k1Sha256Tai::SUITE_STRING),
        comment:
            "ECVRF (RFC 9381 §5) over secp256k1 with SHA-256, try-and-increment, RFC 6979 nonces; \
                  generated by blyan-state-machine (spec/consensus.md CONS-VRF-3). All fields hex."
                .into(),
        vectors,
    }
}

fn pinned() -> VectorFile {
    let text = std::fs::read_to_string(VECTORS_PATH).expect("vrf_secp256k1.json present");
    serde_json::from_str(&text).expect("valid vector file")
}

#[test]
fn cons_vrf_3_secp256k1_vectors_regenerate_identically() {
    let generated = generate();
    if std::env::var_os("BLYAN_REGEN_VRF_VECTORS").is_some() {
        let mut text = serde_json::to_string_pretty(&generated).unwrap();
        text.push('\n');
        std::fs::write(VECTORS_PATH, text).unwrap();
    }
    assert_eq!(generated, pinned());
}

#[test]
fn cons_vrf_3_secp256k1_vectors_verify() {
    let file = pinned();
    assert_eq!(file.suite, "ECVRF-SECP256K1-SHA256-TAI");
    assert_eq!(file.suite_string, "fe");
    assert!(file.vectors.len() >= 8);
    assert!(file.vectors.iter().any(|v| v.alpha.is_empty()));
    for v in &file.vectors {
        let pk = hex::decode(&v.pk).unwrap();
        let alpha = hex::decode(&v.alpha).unwrap();
        let pi = hex::decode(&v.pi).unwrap();
        let beta = vrf::verify::<Secp256k1Sha256Tai>(&pk, &alpha, &pi).unwrap();
        assert_eq!(hex::encode(beta), v.beta, "{}", v.comment);
        let mut bad = pi.clone();
        bad[50] ^= 1;
        assert!(vrf::verify::<Secp256k1Sha256Tai>(&pk, &alpha, &bad).is_err());
        // Independent of the prover: the same key under the P-256 suite rejects.
        assert!(vrf::verify::<P256Sha256Tai>(&pk, &alpha, &pi).is_err());
    }
}

/// Independent cross-check of the secp256k1 instantiation: vectors of another
/// implementation of the same construction (suite_string 0xFE), from
/// `sedaprotocol/vrf-rs` `src/tests/ECVRF_SECP256K1_SHA256_TAI.json` ("extracted
/// from an OpenSSL implementation"): (sk, pk, alpha, pi, beta).
const OTHER_IMPLEMENTATION_SECP256K1: [(&str, &str, &[u8], &str, &str); 3] = [
    (
        "0000000000000000000000000000000000000000000000000000000000000001",
        "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        b"sample",
        concat!(
            "02740dbf5b241f1badd8b7a79af219b9967c2fd0606a55e0e9331b391d70d544c6",
            "21a2704cf30227a63b58e41b45e5dd58",
            "9a16c2d886d71c2d5a0901a315027d0b7602a777a99693ffd8cca7054799ac95",
        ),
        "016314744433d388b614524d2db951ddf0f91d44b73e7535fb21efe33e606f48",
    ),
    (
        "0000000000000000000000000000000000000000000000000000000000000002",
        "02c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5",
        b"sample",
        concat!(
            "0257aa0e5e05f03085afe262f3d27c7bb27d2c31a61d3aeffcf1432c15a8fc2dff",
            "af24fffd58154dfa57290ed0d9e26757",
            "b6e35976c028f564c0aba71488aa34da47d43b24f599f4bdd3882ceaa4a702d2",
        ),
        "a5e94494ac2c8e857fad5f065e9fb1125af826df815946cf40808e20b6384ebc",
    ),
    (
        "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0",
        "0300000000000000000000003b78ce563f89a0ed9414f5aa28ad0d96d6795f9c63",
        b"sample",
        concat!(
            "031a36dfe62ae2465107e4927ee2a2f1c71e790822990e3bbd759c445074adcbcb",
            "a5d427bf500efa683afec8a7511ef302",
            "e3a9dc46c9d61ab9b5db56630d707c09044425346b79f32546a80a8f4dbae3c5",
        ),
        "59439addde709d5ff1c749a1c2da2be9b0468517cf2a213125327594ac8f0c96",
    ),
];

#[test]
fn cons_vrf_3_secp256k1_agrees_with_another_implementation() {
    for (sk, pk, alpha, pi, beta) in OTHER_IMPLEMENTATION_SECP256K1 {
        let sk = sk32(sk);
        assert_eq!(
            hex::encode(vrf::public_key::<Secp256k1Sha256Tai>(&sk).unwrap()),
            pk
        );
        let proof = vrf::prove::<Secp256k1Sha256Tai>(&sk, alpha).unwrap();
        assert_eq!(hex::encode(proof), pi);
        let out = vrf::verify::<Secp256k1Sha256Tai>(&hex::decode(pk).unwrap(), alpha, &proof);
        assert_eq!(hex::encode(out.unwrap()), beta);
    }
}
