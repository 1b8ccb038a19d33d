//! A validator's own evaluation of revealed deltas (spec/pol.md POL-EVAL-*,
//! POL-VAL-*): no operator action, no number typed in.
//!
//! - **POL-EVAL-4** Each validator in the active set, for each pending delta
//!   of the model it holds (its `inference.model_dir` block directory,
//!   GEN-MODEL-2), fetches the payloads it needs by their PoL root (its
//!   blob store, else peers, NODE-NET-12: the delta and the target's
//!   accepted deltas), draws the validation sample (POL-VAL-1..3) from the
//!   model's validation pool, measures the head's and the candidate's loss
//!   in one run (`blyan_gpu::pol::evaluate_delta`, POL-EVAL-1..3), commits
//!   `CommitAttestation` inside the commit window and `RevealAttestation`
//!   inside the reveal window, signed with the node key (NODE-OWN-1). What
//!   the submitter claimed is never read.
//! - **POL-EVAL-5** The salt of a commitment is
//!   `SHA3-256("BLYAN/POL/ATTEST-SALT/v1" ‖ node secret key ‖ delta id)`:
//!   secret until revealed, and recomputed after a restart, so a validator
//!   restarted between its commit and its reveal re-evaluates (the same
//!   losses, POL-EVAL-2) and still reveals.
//! - **POL-EVAL-6** One evaluation at a time, on the blocking pool; at most
//!   [`MAX_TRACKED_DELTAS`] deltas remembered; a transaction not in effect
//!   [`RESUBMIT_AFTER_BLOCKS`] blocks after it was sent is sent again.

use crate::blobs::BlobStore;
use crate::own_tx::OwnTxs;
use crate::service::NodeHandle;
use crate::transport::GrpcTransport;
use blyan_gpu::pol::{Evaluation, Weights};
use blyan_state_machine::crypto::sha3_256_parts;
use blyan_state_machine::genesis::Genesis;
use blyan_state_machine::pol::validation::{
    DataPayload, DataRole, VALIDATION_WINDOW_TOKENS, VALIDATION_WINDOWS, sample_windows,
    validation_seed,
};
use blyan_state_machine::pol::{
    PendingDelta, PolBlockType, PolState, PolTx, attestation_commitment,
};
use blyan_state_machine::tx::TxKind;
use blyan_state_machine::types::{Hash32, Height};
use k256::ecdsa::SigningKey;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the evaluator looks at the chain.
pub const EVAL_POLL_MS: u64 = 500;
/// POL-EVAL-6: blocks after which a transaction not yet in effect is resent.
pub const RESUBMIT_AFTER_BLOCKS: u64 = 3;
/// POL-EVAL-6: most deltas remembered at once.
pub const MAX_TRACKED_DELTAS: usize = 1_024;
/// POL-EVAL-5: domain tag of the attestation salt.
pub const ATTEST_SALT_TAG: &[u8] = b"BLYAN/POL/ATTEST-SALT/v1";

/// What the evaluator needs from the node's set-up.
pub struct EvaluatorSetup {
    pub genesis: Genesis,
    /// The block directory of the model this node evaluates.
    pub model_dir: Option<PathBuf>,
    pub key: SigningKey,
    /// Fault injection for tests: reveal losses this many ppm above the
    /// measured ones (`InferenceConfig::misreport_loss_ppm`).
    pub misreport_loss_ppm: u64,
}

/// The model, its tokenizer and its validation tokens, loaded once.
struct ModelContext {
    model_id: Hash32,
    /// Tensors are `Send`, not `Sync`: one evaluation holds them at a time.
    base: Arc<std::sync::Mutex<Weights>>,
    validation_tokens: Arc<Vec<i64>>,
}

#[derive(Default)]
struct Tracked {
    running: bool,
    result: Option<Evaluation>,
    /// Why the evaluation failed (logged once; retried after a while).
    failed_at: Option<Height>,
    commit_sent_at: Option<Height>,
    reveal_sent_at: Option<Height>,
}

/// POL-EVAL-5.
pub fn attestation_salt(key: &SigningKey, delta_id: &Hash32) -> Hash32 {
    let secret = zeroize::Zeroizing::new(key.to_bytes());
    let secret: &[u8] = &secret;
    sha3_256_parts(&[ATTEST_SALT_TAG, secret, delta_id])
}

/// POL-EVAL-1: the PoL roots of the accepted deltas between `base` (a head)
/// and the target block it descends from, oldest first; the target block's
/// model id. `None` if the chain does not hold that lineage.
pub fn accepted_lineage(pol: &PolState, base: &Hash32) -> Option<(Vec<Hash32>, Hash32)> {
    let mut roots = Vec::new();
    let mut cur = *base;
    loop {
        let b = pol.block(&cur)?;
        if b.block_type != PolBlockType::Delta {
            roots.reverse();
            return Some((roots, b.model_id));
        }
        roots.push(b.payload_merkle_root);
        cur = b.base_block?;
    }
}

/// POL-VAL-1: the DATA blocks of `model_id` in the genesis, by id; the
/// validation pool is the first whose payload has role `validation`.
pub fn pool_candidates(genesis: &Genesis, model_id: &Hash32) -> Vec<([u8; 32], Hash32)> {
    let mut out: Vec<([u8; 32], Hash32)> = genesis
        .pol_blocks
        .iter()
        .filter(|b| b.block_type == PolBlockType::Data && b.model_id == *model_id)
        .map(|b| (b.id(), b.payload_merkle_root))
        .collect();
    out.sort();
    out
}

async fn load_context(
    setup: &EvaluatorSetup,
    transport: &GrpcTransport,
    blobs: &Arc<BlobStore>,
) -> Result<ModelContext, String> {
    let dir = setup
        .model_dir
        .clone()
        .filter(|d| d.join("manifest.json").is_file())
        .ok_or("no inference.model_dir block directory: this validator cannot evaluate deltas")?;
    let meta_cid = crate::model::blocks_of_dir(&dir, Default::default())
        .map_err(|e| e.to_string())?
        .registered[0]
        .block
        .payload_cid
        .clone();
    // GEN-MODEL-2: the genesis meta block whose payload is this manifest.
    let model_id = setup
        .genesis
        .pol_blocks
        .iter()
        .find(|b| b.block_type == PolBlockType::Meta && b.payload_cid == meta_cid)
        .map(|b| b.id())
        .ok_or("the genesis registers no meta block for this node's model_dir")?;
    let mut validation = None;
    for (id, root) in pool_candidates(&setup.genesis, &model_id) {
        let payload = transport
            .fetch_payload(&root, blobs)
            .await
            .map_err(|e| format!("DATA block {}: {e}", hex::encode(id)))?;
        if let Ok(p) = DataPayload::decode(&payload)
            && p.role == DataRole::Validation
        {
            validation = Some(p.text.to_string());
            break;
        }
    }
    let text =
        validation.ok_or("the genesis registers no validation pool for the model (POL-VAL-1)")?;
    tokio::task::spawn_blocking(move || -> Result<ModelContext, String> {
        let base = Weights::load(Some(&dir)).map_err(|e| e.to_string())?;
        let tokenizer = tokenizer_of(&dir).map_err(|e| e.to_string())?;
        let tokens = tokenizer.encode(&text).map_err(|e| e.to_string())?;
        Ok(ModelContext {
            model_id,
            base: Arc::new(std::sync::Mutex::new(base)),
            validation_tokens: Arc::new(tokens),
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The tokenizer of a block directory (its `tokenizer.json`, else the
/// embedded model's byte-level one).
pub fn tokenizer_of(dir: &std::path::Path) -> blyan_gpu::Result<blyan_gpu::tokenizer::Tokenizer> {
    if dir.join("tokenizer.json").is_file() {
        blyan_gpu::tokenizer::Tokenizer::from_dir(dir)
    } else {
        blyan_gpu::tokenizer::Tokenizer::from_json(
            &blyan_gpu::tokenizer::byte_level_tokenizer_json(blyan_gpu::default_model::EOS_ID),
        )
    }
}

/// POL-VAL-2/3: the validation windows of a delta revealed in the block
/// with hash `reveal_block_hash`.
pub fn validation_windows(
    tokens: &[i64],
    delta_id: &Hash32,
    reveal_block_hash: &Hash32,
) -> Result<Vec<Vec<i64>>, String> {
    let seed = validation_seed(delta_id, reveal_block_hash);
    let starts = sample_windows(
        &seed,
        tokens.len() as u64,
        VALIDATION_WINDOWS,
        VALIDATION_WINDOW_TOKENS,
    )
    .map_err(|e| e.to_string())?;
    blyan_gpu::pol::windows(tokens, &starts, VALIDATION_WINDOW_TOKENS as usize)
        .map_err(|e| e.to_string())
}

/// Everything one evaluation needs, fetched; then the evaluation itself.
async fn evaluate(
    node: &NodeHandle,
    transport: &GrpcTransport,
    blobs: &Arc<BlobStore>,
    ctx: &ModelContext,
    pol: &PolState,
    p: &PendingDelta,
) -> Result<Evaluation, String> {
    let base = p.block.base_block.ok_or("a delta without a base")?;
    let (lineage, model_id) =
        accepted_lineage(pol, &base).ok_or("the delta's base has no lineage on chain")?;
    if model_id != ctx.model_id {
        return Err("the delta is for another model than this node's".into());
    }
    // POL-EVAL-1: every target of the model at its head, the delta's own
    // target at its base (its head, unless the delta is already stale).
    let mut accepted = Vec::new();
    for (key, head) in pol.heads_of_model(&model_id) {
        let roots = if key == p.target {
            lineage.clone()
        } else {
            accepted_lineage(pol, &head.block_id)
                .ok_or("a head of the model has no lineage on chain")?
                .0
        };
        let target = blyan_gpu::pol::Target::from_key(&key)
            .ok_or("a target of the model is not a layer, expert or router")?;
        for root in &roots {
            accepted.push((
                target,
                transport
                    .fetch_payload(root, blobs)
                    .await
                    .map_err(|e| format!("accepted delta payload: {e}"))?,
            ));
        }
    }
    let delta = transport
        .fetch_payload(&p.block.payload_merkle_root, blobs)
        .await
        .map_err(|e| format!("delta payload: {e}"))?;
    let reveal_block = node
        .reader
        .block(p.revealed_height)
        .map_err(|e| e.to_string())?
        .ok_or("the reveal's block is not stored")?;
    let windows = validation_windows(
        &ctx.validation_tokens,
        &p.delta_id,
        &reveal_block.block.hash(),
    )?;
    let target = blyan_gpu::pol::Target::from_key(&p.target)
        .ok_or("the delta's target is not a layer, expert or router")?;
    let base_weights = ctx.base.clone();
    tokio::task::spawn_blocking(move || {
        let base = base_weights.lock().unwrap_or_else(|p| p.into_inner());
        blyan_gpu::pol::evaluate_delta(&base, target, &accepted, &delta, &windows)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

type Done = tokio::sync::mpsc::Sender<(Hash32, Result<Evaluation, String>)>;

/// Starts one evaluation; its result comes back on `done`.
fn spawn_evaluation(
    node: &NodeHandle,
    transport: &Arc<GrpcTransport>,
    blobs: &Arc<BlobStore>,
    ctx: &Arc<ModelContext>,
    snap: &Arc<crate::service::Snapshot>,
    p: &PendingDelta,
    done: &Done,
) {
    let (node, transport, blobs, ctx, snap, p, done) = (
        node.clone(),
        transport.clone(),
        blobs.clone(),
        ctx.clone(),
        snap.clone(),
        p.clone(),
        done.clone(),
    );
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = evaluate(&node, &transport, &blobs, &ctx, snap.ledger.pol(), &p).await;
        node.chain_metrics.evaluation_ms.observe(started.elapsed());
        let _ = done.send((p.delta_id, r)).await;
    });
}

/// POL-EVAL-4..6: the evaluator loop.
pub async fn run_evaluator(
    node: NodeHandle,
    transport: Arc<GrpcTransport>,
    blobs: Arc<BlobStore>,
    own: Arc<OwnTxs>,
    setup: EvaluatorSetup,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = node.address;
    let mut ctx: Option<Arc<ModelContext>> = None;
    let mut ctx_error_logged = false;
    let mut tracked: BTreeMap<Hash32, Tracked> = BTreeMap::new();
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::channel::<(Hash32, Result<Evaluation, String>)>(4);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(EVAL_POLL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((id, r)) = done_rx.recv() => {
                let height = crate::api::snapshot(&node).height();
                if let Some(t) = tracked.get_mut(&id) {
                    t.running = false;
                    match r {
                        Ok(mut e) => {
                            info!(delta = %hex::encode(id), head_loss = e.head_loss_micronats, loss = e.loss_micronats, "delta evaluated");
                            if setup.misreport_loss_ppm > 0 {
                                let up = |v: u64| v.saturating_add(((u128::from(v) * u128::from(setup.misreport_loss_ppm)) / 1_000_000) as u64);
                                e.loss_micronats = up(e.loss_micronats);
                                e.head_loss_micronats = up(e.head_loss_micronats);
                                warn!(delta = %hex::encode(id), "fault injection: misreporting the losses");
                            }
                            t.result = Some(e);
                        }
                        Err(why) => {
                            warn!(delta = %hex::encode(id), %why, "delta not evaluated");
                            t.failed_at = Some(height);
                        }
                    }
                }
                continue;
            }
            _ = shutdown.changed() => return,
        }
        let snap = crate::api::snapshot(&node);
        let height = snap.height();
        let pol = snap.ledger.pol();
        // POL-30: only a validator with stake attests.
        if !snap.ledger.active_set().iter().any(|(a, _)| *a == me) {
            continue;
        }
        tracked.retain(|id, _| pol.pending_delta(id).is_some());
        let pending: Vec<PendingDelta> = pol.pending_deltas().cloned().collect();
        if pending.is_empty() {
            continue;
        }
        if ctx.is_none() {
            match load_context(&setup, &transport, &blobs).await {
                Ok(c) => {
                    info!(model = %hex::encode(c.model_id), validation_tokens = c.validation_tokens.len(), "delta evaluator ready");
                    ctx = Some(Arc::new(c));
                }
                Err(why) => {
                    if !ctx_error_logged {
                        warn!(%why, "this validator does not evaluate deltas");
                        ctx_error_logged = true;
                    }
                    continue;
                }
            }
        }
        let c = ctx.clone().expect("loaded above");
        let any_running = tracked.values().any(|t| t.running);
        for p in pending {
            if tracked.len() >= MAX_TRACKED_DELTAS && !tracked.contains_key(&p.delta_id) {
                break;
            }
            let mine = p.attestations.iter().find(|a| a.validator == me).cloned();
            let t = tracked.entry(p.delta_id).or_default();
            // The next block has height + 1: a commit must land by
            // commit_end_height, a reveal after it and by reveal_end_height.
            let in_commit_window = height < p.commit_end_height;
            let in_reveal_window = height >= p.commit_end_height && height < p.reveal_end_height;
            let stale =
                |sent: Option<Height>| sent.is_none_or(|at| height >= at + RESUBMIT_AFTER_BLOCKS);
            match (&mine, t.result) {
                (None, None) if in_commit_window && !t.running && !any_running => {
                    if t.failed_at
                        .is_some_and(|at| height < at + RESUBMIT_AFTER_BLOCKS)
                    {
                        continue;
                    }
                    t.running = true;
                    spawn_evaluation(&node, &transport, &blobs, &c, &snap, &p, &done_tx);
                    break; // one at a time (POL-EVAL-6)
                }
                (None, Some(e)) if in_commit_window && stale(t.commit_sent_at) => {
                    let salt = attestation_salt(&setup.key, &p.delta_id);
                    let commitment = attestation_commitment(
                        &p.delta_id,
                        e.loss_micronats,
                        e.head_loss_micronats,
                        &salt,
                        &me,
                    );
                    let kind = TxKind::Pol(Box::new(PolTx::CommitAttestation {
                        delta_id: p.delta_id,
                        commitment,
                    }));
                    match own.submit(&node, kind).await {
                        Ok(_) => t.commit_sent_at = Some(height),
                        Err(e) => {
                            warn!(reason = %e.reason, "attestation commit not accepted by the pool")
                        }
                    }
                }
                (Some(a), Some(e))
                    if a.revealed.is_none() && in_reveal_window && stale(t.reveal_sent_at) =>
                {
                    let kind = TxKind::Pol(Box::new(PolTx::RevealAttestation {
                        delta_id: p.delta_id,
                        loss_micronats: e.loss_micronats,
                        head_loss_micronats: e.head_loss_micronats,
                        salt: attestation_salt(&setup.key, &p.delta_id),
                    }));
                    match own.submit(&node, kind).await {
                        Ok(_) => t.reveal_sent_at = Some(height),
                        Err(e) => {
                            warn!(reason = %e.reason, "attestation reveal not accepted by the pool")
                        }
                    }
                }
                // Committed before a restart: evaluate again to reveal (POL-EVAL-5).
                (Some(a), None)
                    if a.revealed.is_none()
                        && height < p.reveal_end_height
                        && !t.running
                        && !any_running =>
                {
                    if t.failed_at
                        .is_some_and(|at| height < at + RESUBMIT_AFTER_BLOCKS)
                    {
                        continue;
                    }
                    t.running = true;
                    spawn_evaluation(&node, &transport, &blobs, &c, &snap, &p, &done_tx);
                    break;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pol_eval_5_salt_is_secret_per_key_and_stable_per_delta() {
        let k1 = SigningKey::from_slice(&[7; 32]).unwrap();
        let k2 = SigningKey::from_slice(&[8; 32]).unwrap();
        assert_eq!(
            attestation_salt(&k1, &[1; 32]),
            attestation_salt(&k1, &[1; 32])
        );
        assert_ne!(
            attestation_salt(&k1, &[1; 32]),
            attestation_salt(&k2, &[1; 32])
        );
        assert_ne!(
            attestation_salt(&k1, &[1; 32]),
            attestation_salt(&k1, &[2; 32])
        );
    }
}
