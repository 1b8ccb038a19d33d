//! MoE experts on other nodes (spec/inference.md RT-PIPE-8).
//!
//! - **RT-PIPE-8** A stage of a Qwen3-MoE model runs its layers' attention
//!   and routers itself. The router's plan (RT-ROUTE-4) names a holder for
//!   every `(layer, expert)` of the stage, sent in the session's `Open`.
//!   At each MoE layer the stage computes the routing; the rows routed to
//!   experts it holds are computed locally, and those routed to experts
//!   held elsewhere go in one `blyan.p2p.v1.Peer/Expert` call per holder
//!   (all in parallel; the call carries each expert's rows, already
//!   normalised). Each expert's unweighted output comes back; the stage
//!   weights them and adds them in increasing expert order, wherever they
//!   were computed, so the layer's output has the bits of one process.
//! - A call names the model and layer and carries `(expert, rows)` pairs in
//!   increasing expert order, the dtype and the hidden size; every bound
//!   ([`MAX_EXPERTS_PER_CALL`], [`crate::pipeline::MAX_STAGE_TENSOR_BYTES`])
//!   is checked from the header before anything is allocated. The answer
//!   has the same form: one output per expert, as many rows as sent.
//! - The serving node computes from the experts it holds (its engine's
//!   weights, shared), off the engine's thread, at most
//!   [`MAX_EXPERT_CALLS_IN_FLIGHT`] at once (more: `busy`), so two stages
//!   that call each other's experts never wait on each other's engine.
//! - An expert call that fails ends the step with an `inference` error
//!   naming the expert's node ([`blamed_expert`]), and the router replays
//!   the request without that node (RT-PIPE-4); a stage's own failure
//!   names the stage.
//! - The stage reports the `(layer, expert)` pairs some token was routed
//!   to, once at the session's end (`u` message before its finish), which
//!   the router returns as `experts_used`.

use crate::Error;
use blyan_state_machine::types::{Address, Hash32};
use bytes::Bytes;
use std::collections::BTreeMap;

/// RT-PIPE-8: most experts one call carries.
pub const MAX_EXPERTS_PER_CALL: usize = 1024;
/// RT-PIPE-8: expert calls a node computes or queues at once.
pub const MAX_EXPERT_CALLS_IN_FLIGHT: usize = 8;
/// RT-PIPE-8: the largest `Expert` message (a tensor and its header).
pub const MAX_EXPERT_MESSAGE_BYTES: usize =
    crate::pipeline::MAX_STAGE_TENSOR_BYTES + HEADER_BYTES + 6 * MAX_EXPERTS_PER_CALL;

const HEADER_BYTES: usize = 32 + 4 + 1 + 4 + 2;

/// Where each `(layer, expert)` of a stage is computed.
pub type Placement = BTreeMap<(u32, u16), Address>;

/// What a stage session's steps need to call experts elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StagePlan {
    /// The model's meta block id (what expert calls name).
    pub model: Hash32,
    pub placement: Placement,
}

/// Rows for (or from) several experts of one layer: each expert's rows
/// `[rows, hidden]`, one after the other, little-endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertRows {
    pub dtype: crate::pipeline::Dtype,
    pub hidden: u32,
    /// `(expert, rows)`, strictly increasing by expert.
    pub experts: Vec<(u16, u32)>,
    pub bytes: Vec<u8>,
}

/// One `Expert` call: experts of layer `layer` of model `model`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertCall {
    pub model: Hash32,
    pub layer: u32,
    pub rows: ExpertRows,
}

fn bad(msg: String) -> Error {
    Error::BadRequest(format!("expert message: {msg}"))
}

impl ExpertRows {
    /// Bytes the listed rows take, if within the bound.
    fn expected_bytes(&self) -> Result<usize, Error> {
        use crate::pipeline::Dtype;
        if !matches!(self.dtype, Dtype::F32 | Dtype::Bf16) {
            return Err(bad(format!("rows of {}", self.dtype.name())));
        }
        if self.hidden == 0 || self.experts.is_empty() {
            return Err(bad("no rows".into()));
        }
        if self.experts.len() > MAX_EXPERTS_PER_CALL {
            return Err(bad(format!(
                "{} experts in one call, over {MAX_EXPERTS_PER_CALL}",
                self.experts.len()
            )));
        }
        if self.experts.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(bad("experts not strictly increasing".into()));
        }
        if self.experts.iter().any(|&(_, r)| r == 0) {
            return Err(bad("an expert with no rows".into()));
        }
        let rows: u64 = self.experts.iter().map(|&(_, r)| u64::from(r)).sum();
        rows.checked_mul(u64::from(self.hidden))
            .and_then(|n| n.checked_mul(self.dtype.size() as u64))
            .filter(|&n| n <= crate::pipeline::MAX_STAGE_TENSOR_BYTES as u64)
            .map(|n| n as usize)
            .ok_or_else(|| {
                bad(format!(
                    "{rows} rows of {} are over {} bytes",
                    self.hidden,
                    crate::pipeline::MAX_STAGE_TENSOR_BYTES
                ))
            })
    }

    /// The byte range of the `i`-th expert's rows.
    pub fn slice(&self, i: usize) -> &[u8] {
        let row = self.hidden as usize * self.dtype.size();
        let start: usize = self.experts[..i].iter().map(|&(_, r)| r as usize).sum();
        let len = self.experts[i].1 as usize;
        &self.bytes[start * row..(start + len) * row]
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        let expected = self.expected_bytes().expect("encoded rows are well-formed");
        assert_eq!(expected, self.bytes.len(), "rows match their shape");
        v.push(self.dtype.code());
        v.extend_from_slice(&self.hidden.to_le_bytes());
        v.extend_from_slice(&(self.experts.len() as u16).to_le_bytes());
        for &(e, r) in &self.experts {
            v.extend_from_slice(&e.to_le_bytes());
            v.extend_from_slice(&r.to_le_bytes());
        }
        v.extend_from_slice(&self.bytes);
    }

    fn decode_from(b: &[u8]) -> Result<ExpertRows, Error> {
        let take = |b: &[u8], at: usize, n: usize| -> Result<Vec<u8>, Error> {
            b.get(at..at + n)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| bad("truncated".into()))
        };
        let dtype =
            crate::pipeline::Dtype::from_code(*b.first().ok_or_else(|| bad("empty".into()))?)?;
        let hidden = u32::from_le_bytes(take(b, 1, 4)?.try_into().expect("4 bytes"));
        let n = u16::from_le_bytes(take(b, 5, 2)?.try_into().expect("2 bytes")) as usize;
        if n > MAX_EXPERTS_PER_CALL {
            return Err(bad(format!("{n} experts, over {MAX_EXPERTS_PER_CALL}")));
        }
        let list = take(b, 7, 6 * n)?;
        let experts: Vec<(u16, u32)> = list
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_le_bytes([c[0], c[1]]),
                    u32::from_le_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        let mut rows = ExpertRows {
            dtype,
            hidden,
            experts,
            bytes: Vec::new(),
        };
        let expected = rows.expected_bytes()?;
        let body = &b[7 + 6 * n..];
        if body.len() != expected {
            return Err(bad(format!(
                "{} bytes of rows where the header calls for {expected}",
                body.len()
            )));
        }
        rows.bytes = body.to_vec();
        Ok(rows)
    }

    pub fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(7 + 6 * self.experts.len() + self.bytes.len());
        self.encode_into(&mut v);
        Bytes::from(v)
    }

    pub fn decode(b: &[u8]) -> Result<ExpertRows, Error> {
        Self::decode_from(b)
    }
}

impl ExpertCall {
    pub fn encode(&self) -> Bytes {
        let mut v =
            Vec::with_capacity(36 + 7 + 6 * self.rows.experts.len() + self.rows.bytes.len());
        v.extend_from_slice(&self.model);
        v.extend_from_slice(&self.layer.to_le_bytes());
        self.rows.encode_into(&mut v);
        Bytes::from(v)
    }

    pub fn decode(b: &[u8]) -> Result<ExpertCall, Error> {
        if b.len() < 36 {
            return Err(bad("truncated".into()));
        }
        Ok(ExpertCall {
            model: b[..32].try_into().expect("32 bytes"),
            layer: u32::from_le_bytes(b[32..36].try_into().expect("4 bytes")),
            rows: ExpertRows::decode_from(&b[36..])?,
        })
    }
}

const BLAME: &str = "expert node 0x";

/// RT-PIPE-8: the error a stage answers when an expert call to `node` failed.
pub fn expert_failure(node: Address, why: &str) -> Error {
    Error::Inference(format!("{BLAME}{}: {why}", hex::encode(node.0)))
}

/// RT-PIPE-8: the expert node a stage's error names, if it names one.
pub fn blamed_expert(message: &str) -> Option<Address> {
    let at = message.find(BLAME)? + BLAME.len();
    let hex40 = message.get(at..at + 40)?;
    let bytes: [u8; 20] = hex::decode(hex40).ok()?.try_into().ok()?;
    Some(Address(bytes))
}

/// RT-PIPE-8: the wire form of a placement in a session's `Open`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenExpert {
    pub layer: u32,
    pub expert: u16,
    /// `0x…`
    pub node: String,
}

/// The placement an `Open` carries, checked: each pair once, addresses well
/// formed, layers within the stage's.
pub fn placement_of(
    list: &[OpenExpert],
    (first, last): (u32, u32),
    experts_per_layer: usize,
) -> Result<Placement, Error> {
    let mut out = Placement::new();
    for e in list {
        if !(first..=last).contains(&e.layer) || usize::from(e.expert) >= experts_per_layer {
            return Err(bad(format!(
                "expert {} of layer {} is not part of this stage",
                e.expert, e.layer
            )));
        }
        let node = e
            .node
            .strip_prefix("0x")
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 20]>::try_from(b).ok())
            .map(Address)
            .ok_or_else(|| bad(format!("node {:?} is not an address", e.node)))?;
        if out.insert((e.layer, e.expert), node).is_some() {
            return Err(bad(format!(
                "expert {} of layer {} placed twice",
                e.expert, e.layer
            )));
        }
    }
    Ok(out)
}

/// RT-PIPE-8: the placement of a planned stage, for its `Open`.
pub fn open_experts(stage: &blyan_route::route::Stage) -> Vec<OpenExpert> {
    stage
        .experts
        .iter()
        .map(|a| OpenExpert {
            layer: a.layer,
            expert: a.expert,
            node: crate::api::hex0x(&a.node.0),
        })
        .collect()
}

/// RT-PIPE-8: the `u` message: the `(layer, expert)` pairs a session used.
pub fn encode_used(used: &std::collections::BTreeSet<(u32, u16)>) -> Bytes {
    let mut v = vec![crate::pipeline::TAG_USED];
    v.extend_from_slice(&serde_json::to_vec(used).expect("pairs serialise"));
    Bytes::from(v)
}

/// RT-PIPE-8: the pairs of a `u` message (at most one per expert of a
/// 4,096-layer model's stage is far more than any holds; bounded by the
/// message size).
pub fn decode_used(body: &[u8]) -> Result<Vec<(u32, u16)>, Error> {
    serde_json::from_slice(body).map_err(|e| bad(format!("used experts: {e}")))
}

/// RT-PIPE-8: makes expert calls through the transport, for the engine's
/// thread (which blocks on them: expert work never runs on that thread).
/// The transport is held weakly: it holds the engine (its stage sink), and
/// a strong reference back would keep both, and the node's stores, alive
/// after the node stops.
pub struct TransportExperts {
    pub transport: std::sync::Weak<crate::transport::GrpcTransport>,
    pub runtime: tokio::runtime::Handle,
    /// Deadline of one call.
    pub timeout_ms: u64,
}

impl crate::inference::ExpertClient for TransportExperts {
    fn call_all(&self, calls: Vec<(Address, ExpertCall)>) -> Vec<Result<ExpertRows, Error>> {
        let Some(transport) = self.transport.upgrade() else {
            return calls
                .iter()
                .map(|(node, _)| Err(expert_failure(*node, "this node is stopping")))
                .collect();
        };
        let timeout = std::time::Duration::from_millis(self.timeout_ms);
        self.runtime.block_on(async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, (node, call)) in calls.into_iter().enumerate() {
                let transport = transport.clone();
                set.spawn(async move {
                    let one = async {
                        let client = transport.client(node).await.map_err(|e| e.to_string())?;
                        let answer = client.expert(call.encode()).await.map_err(|s| {
                            if crate::transport::is_connection_failure(&s) {
                                transport.forget_client(&node);
                            }
                            format!("{:?}: {}", s.code(), s.message())
                        })?;
                        let rows = ExpertRows::decode(&answer).map_err(|e| e.to_string())?;
                        if rows.experts != call.rows.experts
                            || rows.hidden != call.rows.hidden
                            || rows.dtype != call.rows.dtype
                        {
                            return Err("an answer for other rows".to_string());
                        }
                        Ok(rows)
                    };
                    let r = match tokio::time::timeout(timeout, one).await {
                        Ok(r) => r,
                        Err(_) => Err("no answer within the deadline".into()),
                    };
                    (i, r.map_err(|e| expert_failure(node, &e)))
                });
            }
            let mut out: Vec<Option<Result<ExpertRows, Error>>> = Vec::new();
            while let Some(done) = set.join_next().await {
                let (i, r) = done.unwrap_or_else(|e| {
                    (
                        usize::MAX,
                        Err(Error::Inference(format!("expert call task: {e}"))),
                    )
                });
                if i == usize::MAX {
                    continue;
                }
                if out.len() <= i {
                    out.resize_with(i + 1, || None);
                }
                out[i] = Some(r);
            }
            out.into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| Err(Error::Inference("an expert call was lost".into())))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Dtype;

    fn rows(experts: Vec<(u16, u32)>, hidden: u32) -> ExpertRows {
        let n: u32 = experts.iter().map(|e| e.1).sum();
        ExpertRows {
            dtype: Dtype::F32,
            hidden,
            experts,
            bytes: (0..n * hidden * 4).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn rt_pipe_8_calls_round_trip_and_slice_per_expert() {
        let call = ExpertCall {
            model: [7; 32],
            layer: 3,
            rows: rows(vec![(1, 2), (5, 1)], 4),
        };
        let back = ExpertCall::decode(&call.encode()).unwrap();
        assert_eq!(back, call);
        assert_eq!(back.rows.slice(0).len(), 2 * 4 * 4);
        assert_eq!(back.rows.slice(1), &call.rows.bytes[32..48]);
    }

    #[test]
    fn rt_pipe_8_malformed_calls_are_refused_before_allocation() {
        let good = ExpertCall {
            model: [0; 32],
            layer: 0,
            rows: rows(vec![(0, 1)], 2),
        }
        .encode();
        // Truncated anywhere.
        for cut in [0, 10, 36, 40, 43, good.len() - 1] {
            assert!(ExpertCall::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        // One byte too many.
        let mut long = good.to_vec();
        long.push(0);
        assert!(ExpertCall::decode(&long).is_err());
        // A header announcing 4 Gi rows of 4 Ki is refused from the header.
        let mut huge = good[..36].to_vec();
        huge.push(0);
        huge.extend_from_slice(&4096u32.to_le_bytes());
        huge.extend_from_slice(&1u16.to_le_bytes());
        huge.extend_from_slice(&0u16.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = ExpertCall::decode(&huge).unwrap_err().to_string();
        assert!(err.contains("over"), "{err}");
        // Experts out of order, or listed twice.
        let mut twice = rows(vec![(2, 1), (2, 1)], 2);
        assert!(twice.expected_bytes().is_err());
        twice.experts = vec![(3, 1), (2, 1)];
        assert!(twice.expected_bytes().is_err());
        // Ids and logits dtypes are no rows.
        let mut ids = rows(vec![(0, 1)], 2);
        ids.dtype = Dtype::I64;
        assert!(ids.expected_bytes().is_err());
    }

    #[test]
    fn rt_pipe_8_blame_names_the_expert_node() {
        let node = Address([0xab; 20]);
        let e = expert_failure(node, "Unavailable: gone");
        assert_eq!(blamed_expert(&e.to_string()), Some(node));
        assert_eq!(blamed_expert("inference: a stage failed"), None);
        assert_eq!(blamed_expert("expert node 0xzz"), None);
    }

    #[test]
    fn rt_pipe_8_placements_are_checked() {
        let at = |layer, expert, node: &str| OpenExpert {
            layer,
            expert,
            node: node.into(),
        };
        let a = format!("0x{}", "11".repeat(20));
        let p = placement_of(&[at(0, 1, &a), at(1, 0, &a)], (0, 1), 8).unwrap();
        assert_eq!(p.len(), 2);
        assert!(
            placement_of(&[at(2, 0, &a)], (0, 1), 8).is_err(),
            "layer outside"
        );
        assert!(
            placement_of(&[at(0, 8, &a)], (0, 1), 8).is_err(),
            "no such expert"
        );
        assert!(placement_of(&[at(0, 1, &a), at(0, 1, &a)], (0, 1), 8).is_err());
        assert!(placement_of(&[at(0, 1, "0x12")], (0, 1), 8).is_err());
    }
}
