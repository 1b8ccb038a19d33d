//! The served model follows the chain (spec/pol.md POL-SERVE-*).
//!
//! - **POL-SERVE-1** A node serving a registered model (its
//!   `inference.model_dir` block directory, GEN-MODEL-2) watches the heads
//!   of that model's targets. When one changes (a delta was accepted,
//!   POL-35), it fetches every accepted delta of the model by its PoL root
//!   (its blob store, else peers, NODE-NET-12; each checked against the
//!   root the chain holds) and hands the engine the genesis weights plus
//!   those deltas ([`crate::inference::HeadUpdate`]). A node started on a
//!   chain with accepted deltas builds the same head before its first
//!   answer, so a restart serves what the chain says.
//! - **POL-SERVE-2** The engine takes a new head between two jobs, never
//!   inside one: a request runs on one head from its first token to its
//!   last, and its answer names it (`head` in `/chat`,
//!   `system_fingerprint` in `/v1/chat/completions`). The name is
//!   [`head_name`]: it changes exactly when a head of the model changes.
//! - **POL-SERVE-3** A delta that cannot be fetched is retried every
//!   [`FOLLOW_POLL_MS`]; one that cannot be applied leaves the old head
//!   served and is counted (`HeadSlot::swap_failures`).

use crate::blobs::BlobStore;
use crate::inference::{HeadUpdate, InferenceHandle};
use crate::service::NodeHandle;
use crate::transport::GrpcTransport;
use blyan_gpu::pol::Target;
use blyan_state_machine::crypto::sha3_256_parts;
use blyan_state_machine::pol::PolState;
use blyan_state_machine::types::Hash32;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::warn;

/// How often the follower looks at the chain's heads.
pub const FOLLOW_POLL_MS: u64 = 500;
/// The longest the follower waits before retrying a payload it could not
/// fetch (POL-SERVE-3): short enough that a node that gets the payload back
/// still serves the new head within the 10 s POL-SERVE-1 aims for.
pub const FOLLOW_RETRY_MAX_MS: u64 = 5_000;

/// POL-SERVE-3: the wait after `failures` consecutive failed syncs: the
/// poll interval, doubled per failure, at most [`FOLLOW_RETRY_MAX_MS`].
pub fn retry_delay_ms(failures: u32) -> u64 {
    FOLLOW_POLL_MS
        .saturating_mul(1u64 << failures.min(16))
        .min(FOLLOW_RETRY_MAX_MS)
}

/// POL-SERVE-2: the name of the model's current heads: `blyan-head-` and
/// the first 8 bytes, in hex, of SHA3-256 over the head block ids of the
/// model's targets in target-key order.
pub fn head_name(pol: &PolState, model_id: &Hash32) -> String {
    let heads = pol.heads_of_model(model_id);
    let ids: Vec<&[u8]> = heads.iter().map(|(_, h)| h.block_id.as_slice()).collect();
    let digest = sha3_256_parts(&ids);
    format!("blyan-head-{}", hex::encode(&digest[..8]))
}

/// POL-SERVE-1: the PoL roots of every accepted delta of `model_id` with
/// its target, each target's oldest first, targets in key order (targets
/// that are not a layer, expert or router have no deltas to serve).
pub fn accepted_roots(pol: &PolState, model_id: &Hash32) -> Vec<(Target, Hash32)> {
    pol.heads_of_model(model_id)
        .iter()
        .filter_map(|(key, h)| {
            let target = Target::from_key(key)?;
            let (roots, _) = crate::pol_eval::accepted_lineage(pol, &h.block_id)?;
            Some(roots.into_iter().map(move |r| (target, r)))
        })
        .flatten()
        .collect()
}

/// POL-SERVE-1: hands the engine the chain's current heads of `model_id`
/// unless they are `requested` already; the name of what it handed.
pub async fn sync_head(
    node: &NodeHandle,
    transport: &GrpcTransport,
    blobs: &Arc<BlobStore>,
    engine: &InferenceHandle,
    model_id: &Hash32,
    requested: &str,
) -> Result<String, crate::Error> {
    let snap = crate::api::snapshot(node);
    let pol = snap.ledger.pol();
    let name = head_name(pol, model_id);
    if name == requested {
        return Ok(name);
    }
    let mut deltas = Vec::new();
    for (target, root) in accepted_roots(pol, model_id) {
        deltas.push((target, transport.fetch_payload(&root, blobs).await?));
    }
    engine.heads.set(HeadUpdate {
        name: name.clone(),
        deltas,
    });
    Ok(name)
}

/// POL-SERVE-1..3: the follower loop; `requested` is what the node handed
/// the engine at start.
pub async fn run_follower(
    node: NodeHandle,
    transport: Arc<GrpcTransport>,
    blobs: Arc<BlobStore>,
    engine: InferenceHandle,
    model_id: Hash32,
    mut requested: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    loop {
        let wait_ms = if failures == 0 {
            FOLLOW_POLL_MS
        } else {
            retry_delay_ms(failures)
        };
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(wait_ms)) => {}
            _ = shutdown.changed() => return,
        }
        match sync_head(&node, &transport, &blobs, &engine, &model_id, &requested).await {
            Ok(name) => {
                if failures > 0 {
                    tracing::info!(head = %name, failures, "the accepted deltas were fetched");
                }
                failures = 0;
                requested = name;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                // One warning when it starts failing, then one each time the
                // wait doubles (not every poll).
                if failures.is_power_of_two() {
                    warn!(
                        error = %e,
                        failures,
                        retry_in_ms = retry_delay_ms(failures),
                        "an accepted delta could not be fetched; retrying"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pol_serve_3_retries_back_off_to_a_cap() {
        assert_eq!(retry_delay_ms(1), 1_000);
        assert_eq!(retry_delay_ms(2), 2_000);
        assert_eq!(retry_delay_ms(3), 4_000);
        assert_eq!(retry_delay_ms(4), FOLLOW_RETRY_MAX_MS);
        assert_eq!(retry_delay_ms(u32::MAX), FOLLOW_RETRY_MAX_MS);
        let waits: Vec<u64> = (1..10).map(retry_delay_ms).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }
}
