use blyan_route::Error;
use blyan_route::commit::{SignedCommitment, StageCommitment, Tolerance, commit_chunk};
use blyan_route::fault::*;
use blyan_route::rng::SplitMix64;
use blyan_route::spot::{Settlement, settle};
use blyan_state_machine::crypto::sign;
use blyan_state_machine::testkit::{address, key};
use blyan_state_machine::tx::public_key_of;

const CHAIN: &str = "blyan-test";

fn signed(i: u64, states: &[f32]) -> SignedCommitment {
    let k = key(i);
    let c = StageCommitment {
        request_id: [7; 32],
        model: [8; 32],
        head_version: [9; 32],
        node: address(&k),
        first_layer: 2,
        last_layer: 3,
        chunk: commit_chunk(40, 16, states, 8).unwrap(),
    };
    SignedCommitment {
        signature: sign(&k, &c.signing_bytes(CHAIN)),
        public_key: public_key_of(&k),
        commitment: c,
    }
}

fn record() -> FaultRecord {
    let mut r = SplitMix64::new(5);
    let truth: Vec<f32> = (0..16).map(|_| r.normal() as f32).collect();
    let wrong: Vec<f32> = truth.iter().map(|x| -x).collect();
    let stage = signed(1, &wrong);
    let checker = signed(2, &truth);
    let referee = signed(3, &truth);
    let verdict = settle(
        &stage.commitment.chunk,
        &checker.commitment.chunk,
        &referee.commitment.chunk,
        Tolerance::default(),
    );
    assert_eq!(verdict, Settlement::StageFault);
    FaultRecord {
        verdict,
        request_id: [7; 32],
        position: 40,
        model: [8; 32],
        head_version: [9; 32],
        first_layer: 2,
        last_layer: 3,
        input: FaultInput::Hidden {
            dtype: Dtype::Bf16,
            shape: vec![1, 16],
            bytes: vec![0; 32],
        },
        stage,
        checker,
        referee: Some(referee),
        reported_ms: 1_234,
    }
}

fn sign_record(rec: FaultRecord) -> SignedFaultRecord {
    let k = key(50);
    SignedFaultRecord {
        signature: sign(&k, &rec.signing_bytes(CHAIN)),
        reporter_key: public_key_of(&k),
        record: rec,
    }
}

#[test]
fn rt_fault_1_2_a_signed_record_verifies_and_round_trips() {
    let s = sign_record(record());
    assert_eq!(
        s.verify(CHAIN, Tolerance::default()).unwrap(),
        address(&key(50))
    );
    assert_eq!(s.record.loser(), Some(address(&key(1))));
    let bytes = s.encode();
    assert_eq!(SignedFaultRecord::decode(&bytes).unwrap(), s);
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        SignedFaultRecord::decode(&long),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        SignedFaultRecord::decode(&bytes[..bytes.len() - 1]),
        Err(Error::Malformed { .. })
    ));
    // A token-prefix input round-trips too.
    let mut rec = record();
    rec.input = FaultInput::TokenPrefix {
        tokens: vec![1, 2, 3],
    };
    let s = sign_record(rec);
    s.verify(CHAIN, Tolerance::default()).unwrap();
    assert_eq!(SignedFaultRecord::decode(&s.encode()).unwrap(), s);
}

#[test]
fn rt_fault_2_inconsistent_records_are_refused() {
    let tol = Tolerance::default();
    let mut rec = record();
    rec.verdict = Settlement::CheckerFault;
    assert!(matches!(
        sign_record(rec).verify(CHAIN, tol),
        Err(Error::InconsistentFault(_))
    ));
    let mut rec = record();
    rec.position = 41;
    assert!(matches!(
        sign_record(rec).verify(CHAIN, tol),
        Err(Error::InconsistentFault(_))
    ));
    let mut rec = record();
    rec.checker = rec.referee.clone().unwrap();
    assert!(matches!(
        sign_record(rec).verify(CHAIN, tol),
        Err(Error::InconsistentFault(_))
    ));
    let mut rec = record();
    rec.input = FaultInput::Hidden {
        dtype: Dtype::F32,
        shape: vec![1, 16],
        bytes: vec![0; 32],
    };
    assert!(matches!(
        sign_record(rec).verify(CHAIN, tol),
        Err(Error::InconsistentFault(_))
    ));
    let mut rec = record();
    rec.stage.signature[5] ^= 1;
    assert_eq!(
        sign_record(rec).verify(CHAIN, tol),
        Err(Error::BadSignature("commitment"))
    );
    let mut s = sign_record(record());
    s.record.reported_ms += 1;
    assert_eq!(
        s.verify(CHAIN, tol),
        Err(Error::BadSignature("fault record"))
    );
    let mut rec = record();
    rec.input = FaultInput::TokenPrefix {
        tokens: vec![0; MAX_PREFIX_TOKENS + 1],
    };
    let bytes = sign_record(rec).encode();
    assert!(matches!(
        SignedFaultRecord::decode(&bytes),
        Err(Error::TooLarge { .. })
    ));
}
