//! Transactions a node signs with its own key (settlements, PoL
//! attestations), from one nonce sequence (NODE-OWN-1).
//!
//! - **NODE-OWN-1** Every task that submits transactions under the node's
//!   key takes its nonce here: `max(committed nonce, last given + 1)`, so two
//!   tasks never sign the same nonce while both wait for inclusion. A
//!   refusal by the pool, or a transaction given up on (dropped, or not
//!   included after its task's wait), resets the sequence to the committed
//!   nonce, so a gap cannot strand later transactions.

use crate::api::ApiError;
use crate::service::NodeHandle;
use blyan_state_machine::tx::{TxBody, TxKind};
use blyan_state_machine::types::Hash32;
use k256::ecdsa::SigningKey;
use std::sync::Mutex;

/// The tip an own transaction pays per gas unit.
pub const OWN_TIP_PER_GAS: u128 = 1;

/// The node's key and its nonce sequence (NODE-OWN-1).
pub struct OwnTxs {
    key: SigningKey,
    next_nonce: Mutex<u64>,
}

impl OwnTxs {
    pub fn new(key: SigningKey) -> OwnTxs {
        OwnTxs {
            key,
            next_nonce: Mutex::new(0),
        }
    }

    /// Signs `kind` with the next nonce and submits it to the node's pool;
    /// the transaction's id, or the pool's refusal (which resets the
    /// sequence).
    pub async fn submit(&self, node: &NodeHandle, kind: TxKind) -> Result<Hash32, ApiError> {
        let snap = crate::api::snapshot(node);
        let committed = snap.ledger.account(&node.address).nonce;
        let base_fee = snap.ledger.next_block_base_fee();
        let nonce = {
            let mut next = self.next_nonce.lock().expect("nonce lock");
            let n = (*next).max(committed);
            *next = n + 1;
            n
        };
        let tx = TxBody {
            nonce,
            gas_limit: blyan_state_machine::ledger::intrinsic_gas(&kind),
            // Room for the base fee to rise for a while (FEE-2: at most
            // 12.5% a block), and a small tip.
            max_fee_per_gas: base_fee.saturating_mul(2).max(1) + OWN_TIP_PER_GAS,
            max_priority_fee_per_gas: OWN_TIP_PER_GAS,
            kind,
        }
        .sign(&node.chain_id, &self.key);
        let r = crate::api::submit(node, tx).await;
        if r.is_err() {
            self.reset();
        }
        r
    }

    /// Starts the sequence again from the committed nonce.
    pub fn reset(&self) {
        *self.next_nonce.lock().expect("nonce lock") = 0;
    }
}
