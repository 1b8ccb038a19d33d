//! GOLDEN-1/2: the recorded vectors replay exactly and regenerate byte for byte.

fn path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(format!("{name}.json"))
}

#[test]
fn recorded_vectors_replay_and_match_regeneration() {
    for fresh in blyan_golden::generate() {
        let text = std::fs::read_to_string(path(&fresh.name)).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -p blyan-golden -- regen`",
                fresh.name
            )
        });
        let recorded: blyan_golden::Scenario = serde_json::from_str(&text).unwrap();
        blyan_golden::check(&recorded).unwrap_or_else(|e| panic!("{}: {e}", fresh.name));
        assert_eq!(
            recorded, fresh,
            "{}: behaviour changed; if deliberate, run `cargo run -p blyan-golden -- regen` and say why in the commit",
            fresh.name
        );
        insta::assert_snapshot!(fresh.name.clone(), blyan_golden::summary(&fresh));
    }
}

#[test]
fn a_tampered_vector_is_caught() {
    let mut s = blyan_golden::generate().remove(0);
    let flipped = if s.blocks[0].state_root.starts_with("00") {
        "11"
    } else {
        "00"
    };
    s.blocks[0].state_root.replace_range(0..2, flipped);
    assert!(blyan_golden::check(&s).is_err());
}

/// SIG-4: pinned signing vectors verify, and regenerate byte for byte.
#[test]
fn signing_vectors_are_pinned_and_verify() {
    let text = std::fs::read_to_string(path("signing")).unwrap();
    let recorded: Vec<blyan_golden::SigningVector> = serde_json::from_str(&text).unwrap();
    assert_eq!(recorded, blyan_golden::signing_vectors());
    for v in &recorded {
        let bytes = hex::decode(&v.signing_bytes_hex).unwrap();
        let pk = hex::decode(&v.public_key).unwrap();
        let sig: [u8; 64] = hex::decode(&v.signature).unwrap().try_into().unwrap();
        assert!(
            blyan_state_machine::crypto::verify_signature(&pk, &bytes, &sig),
            "{}",
            v.name
        );
        assert!(v.signing_bytes_hex.ends_with(&v.body_hex));
        assert_eq!(
            hex::encode(blyan_state_machine::crypto::sha3_256(&bytes)),
            v.sha3_256
        );
        // CONS-SIG-2: the consensus vectors verify through the node's scheme.
        use blyan_state_machine::consensus::{K256Scheme, Proposal, SignatureScheme, Vote};
        use blyan_state_machine::encoding::Canonical;
        let scheme = K256Scheme {
            chain_id: v.chain_id.clone(),
        };
        let body = hex::decode(&v.body_hex).unwrap();
        if v.name.starts_with("consensus_") && v.name.ends_with("vote")
            || v.name == "consensus_precommit"
        {
            let vote = Vote::decode(&body).unwrap();
            assert!(
                scheme.verify_vote(&pk.clone().try_into().unwrap(), &vote, &sig),
                "{}",
                v.name
            );
        } else if v.name == "consensus_proposal" {
            let p = Proposal::decode(&body).unwrap();
            assert!(
                scheme.verify_proposal(&pk.clone().try_into().unwrap(), &p, &sig),
                "{}",
                v.name
            );
        }
    }
    assert_eq!(
        recorded
            .iter()
            .filter(|v| v.name.starts_with("consensus_"))
            .count(),
        3
    );
}

/// POL-DELTA-1..6: the delta payload vector regenerates byte for byte, its
/// bytes decode to the recorded rows, and its address is POL-3/POL-4's.
#[test]
fn delta_format_vector_is_pinned_and_decodes() {
    use blyan_state_machine::pol::delta::{DeltaPayload, payload_address};
    let text = std::fs::read_to_string(path("pol_delta_format")).unwrap();
    let recorded: blyan_golden::delta_format::DeltaFormatVector =
        serde_json::from_str(&text).unwrap();
    assert_eq!(
        recorded,
        blyan_golden::delta_format::delta_format_vector(),
        "the delta format changed; if deliberate, run `cargo run -p blyan-golden -- regen` and say why in the commit"
    );
    let bytes = hex::decode(&recorded.payload_hex).unwrap();
    let decoded = DeltaPayload::decode(&bytes).unwrap();
    assert_eq!(decoded.encode().unwrap(), bytes);
    let address = payload_address(&bytes);
    assert_eq!(address.size_bytes, recorded.size_bytes);
    assert_eq!(hex::encode(address.merkle_root), recorded.merkle_root);
    assert_eq!(address.cid, recorded.cid);
    assert_eq!(decoded.tensors.len(), recorded.tensors.len());
    for (t, r) in decoded.tensors.iter().zip(&recorded.tensors) {
        assert_eq!(t.name, r.name);
        assert_eq!(t.dtype.name(), r.dtype);
        assert_eq!(t.shape.dims(), r.shape);
        assert_eq!(t.kept_per_row, r.kept_per_row);
        for (i, row) in r.rows.iter().enumerate() {
            let (bits, columns, values) = t.row(i as u32);
            assert_eq!(format!("{bits:#010x}"), row.scale_bits);
            assert_eq!(columns, &row.columns[..]);
            assert_eq!(values, &row.values[..]);
        }
        // Only kept entries may change.
        let cols = t.shape.cols() as usize;
        for (i, (b, a)) in r.base_bits.iter().zip(&r.applied_bits).enumerate() {
            let kept = t.row((i / cols) as u32).1.contains(&((i % cols) as u32));
            assert!(kept || a == b, "{}[{i}] changed but is not kept", t.name);
        }
    }
}
