//! The shipped corpus (spec/pol.md POL-DATA-2): Lewis Carroll's *Alice's
//! Adventures in Wonderland* (public domain; provenance and licence in
//! `runtime/data/corpus/README.md`), embedded in the binary so the PoL loop
//! runs on a fresh machine with no download.
//!
//! - chapters I–VIII: the training pool (a DATA block, role `train`);
//! - chapters IX–X: the validation pool (role `validation`, POL-VAL-1);
//! - chapters XI–XII: never registered, the unpublished split a delta's
//!   real gain is measured on.

use blyan_state_machine::pol::validation::{DataPayload, DataRole};

/// Chapters I–VIII.
pub const TRAIN_TEXT: &str = include_str!("../data/corpus/alice-train.txt");
/// Chapters IX–X.
pub const VALIDATION_TEXT: &str = include_str!("../data/corpus/alice-validation.txt");
/// Chapters XI–XII (never on chain).
pub const HOLDOUT_TEXT: &str = include_str!("../data/corpus/alice-holdout.txt");

/// The DATA payload (POL-DATA-1) of the pool with `role`.
pub fn payload(role: DataRole) -> Vec<u8> {
    let text = match role {
        DataRole::Train => TRAIN_TEXT,
        DataRole::Validation => VALIDATION_TEXT,
    };
    DataPayload { role, text }
        .encode()
        .expect("the shipped corpus is non-empty and far below the cap")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pol_data_2_the_shipped_pools_decode_with_their_roles_and_are_disjoint() {
        for role in [DataRole::Train, DataRole::Validation] {
            let bytes = payload(role);
            assert_eq!(DataPayload::decode(&bytes).unwrap().role, role);
        }
        // No validation or hold-out sentence of 200 bytes appears in training.
        for held in [VALIDATION_TEXT, HOLDOUT_TEXT] {
            let probe = &held[1_000..1_200];
            assert!(!TRAIN_TEXT.contains(probe));
        }
        assert!(
            VALIDATION_TEXT.len() > 5 * 32 * 129,
            "the pool holds several samples"
        );
    }
}
