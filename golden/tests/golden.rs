//! GOLDEN-1/2: the recorded vectors replay exactly and regenerate byte for byte.

fn path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors").join(format!("{name}.json"))
}

#[test]
fn recorded_vectors_replay_and_match_regeneration() {
    for fresh in blyan_golden::generate() {
        let text = std::fs::read_to_string(path(&fresh.name))
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo run -p blyan-golden -- regen`", fresh.name));
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
    let flipped = if s.blocks[0].state_root.starts_with("00") { "11" } else { "00" };
    s.blocks[0].state_root.replace_range(0..2, flipped);
    assert!(blyan_golden::check(&s).is_err());
}
