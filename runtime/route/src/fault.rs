//! Fault records: what a third party needs to recompute a disputed step
//! (spec/inference.md, RT-FAULT-*), kept for a later slashing rule.
//!
//! - **RT-FAULT-1** A [`FaultRecord`] holds the step (request id, position,
//!   model, head version, layers), the stage's input (its hidden-state
//!   bytes with dtype and shape, or the token prefix, which with the head
//!   version determines the input), the stage's and the checker's signed
//!   commitments (RT-COMMIT-4), the referee's if there was one, the verdict
//!   (RT-SPOT-4) and the router's clock. The router signs
//!   `signing_bytes(FaultRecord, chain_id, body)` (`blyan/fault-rc/1`).
//! - **RT-FAULT-2** A record verifies iff the router's signature and every
//!   commitment's signature verify (RT-COMMIT-4), every commitment is to
//!   this step (same request, model, head version, layers, first token =
//!   position), the stage, checker and referee are three different nodes,
//!   a hidden input's bytes are `product(shape) × dtype size`, and
//!   re-running RT-SPOT-4 on the commitments gives the recorded verdict.
//! - **RT-FAULT-3** Bounds: input at most 16 MiB ([`MAX_INPUT_BYTES`]), at
//!   most [`MAX_PREFIX_TOKENS`] prefix tokens, at most 4 shape dimensions.

use crate::codec::{Reader, Writer};
use crate::commit::{SignedCommitment, Tolerance};
use crate::spot::{Settlement, settle};
use crate::{Error, Result};
use blyan_state_machine::crypto::verify_signature;
use blyan_state_machine::tx::{Domain, PublicKey, signing_bytes};
use blyan_state_machine::types::{Address, Hash32};

/// RT-FAULT-3.
pub const MAX_INPUT_BYTES: usize = 16 * 1024 * 1024;
/// RT-FAULT-3.
pub const MAX_PREFIX_TOKENS: usize = 131_072;
/// RT-FAULT-3.
pub const MAX_SHAPE_DIMS: usize = 4;

/// Element type of a hidden-state input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32 = 0,
    Bf16 = 1,
    F16 = 2,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Dtype> {
        match v {
            0 => Ok(Dtype::F32),
            1 => Ok(Dtype::Bf16),
            2 => Ok(Dtype::F16),
            _ => Err(Error::Malformed {
                what: "fault record",
                reason: "unknown dtype",
            }),
        }
    }
}

/// RT-FAULT-1: what the stage was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultInput {
    Hidden {
        dtype: Dtype,
        shape: Vec<u32>,
        bytes: Vec<u8>,
    },
    /// The request's tokens up to the step; with the head version they
    /// determine every stage's input.
    TokenPrefix { tokens: Vec<u32> },
}

impl FaultInput {
    fn validate(&self) -> Result<()> {
        match self {
            FaultInput::Hidden {
                dtype,
                shape,
                bytes,
            } => {
                if shape.is_empty() || shape.len() > MAX_SHAPE_DIMS {
                    return Err(Error::InconsistentFault("shape must have 1..=4 dimensions"));
                }
                if bytes.len() > MAX_INPUT_BYTES {
                    return Err(Error::TooLarge {
                        what: "fault input",
                        len: bytes.len(),
                        max: MAX_INPUT_BYTES,
                    });
                }
                let n = shape
                    .iter()
                    .try_fold(dtype.size() as u64, |acc, d| acc.checked_mul(u64::from(*d)));
                if n != Some(bytes.len() as u64) {
                    return Err(Error::InconsistentFault(
                        "input bytes do not match shape and dtype",
                    ));
                }
                Ok(())
            }
            FaultInput::TokenPrefix { tokens } => {
                if tokens.len() > MAX_PREFIX_TOKENS {
                    return Err(Error::TooLarge {
                        what: "token prefix",
                        len: tokens.len(),
                        max: MAX_PREFIX_TOKENS,
                    });
                }
                Ok(())
            }
        }
    }
}

/// RT-FAULT-1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    pub verdict: Settlement,
    pub request_id: Hash32,
    pub position: u64,
    pub model: Hash32,
    pub head_version: Hash32,
    pub first_layer: u32,
    pub last_layer: u32,
    pub input: FaultInput,
    pub stage: SignedCommitment,
    pub checker: SignedCommitment,
    pub referee: Option<SignedCommitment>,
    /// The router's clock when the record was made.
    pub reported_ms: u64,
}

fn verdict_byte(v: Settlement) -> u8 {
    match v {
        Settlement::Agree => 0,
        Settlement::StageFault => 1,
        Settlement::CheckerFault => 2,
        Settlement::Undecided => 3,
    }
}

fn verdict_from(v: u8) -> Result<Settlement> {
    Ok(match v {
        0 => Settlement::Agree,
        1 => Settlement::StageFault,
        2 => Settlement::CheckerFault,
        3 => Settlement::Undecided,
        _ => {
            return Err(Error::Malformed {
                what: "fault record",
                reason: "unknown verdict",
            });
        }
    })
}

impl FaultRecord {
    /// The node the verdict blames, if any.
    pub fn loser(&self) -> Option<Address> {
        match self.verdict {
            Settlement::StageFault => Some(self.stage.commitment.node),
            Settlement::CheckerFault => Some(self.checker.commitment.node),
            Settlement::Agree | Settlement::Undecided => None,
        }
    }

    /// RT-ENC-1 body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(verdict_byte(self.verdict));
        w.bytes(&self.request_id);
        w.u64(self.position);
        w.bytes(&self.model);
        w.bytes(&self.head_version);
        w.u32(self.first_layer);
        w.u32(self.last_layer);
        match &self.input {
            FaultInput::Hidden {
                dtype,
                shape,
                bytes,
            } => {
                w.u8(0);
                w.u8(*dtype as u8);
                w.len(shape.len());
                shape.iter().for_each(|d| w.u32(*d));
                w.len(bytes.len());
                w.bytes(bytes);
            }
            FaultInput::TokenPrefix { tokens } => {
                w.u8(1);
                w.len(tokens.len());
                tokens.iter().for_each(|t| w.u32(*t));
            }
        }
        self.stage.encode_into(&mut w);
        self.checker.encode_into(&mut w);
        match &self.referee {
            None => w.u8(0),
            Some(r) => {
                w.u8(1);
                r.encode_into(&mut w);
            }
        }
        w.u64(self.reported_ms);
        w.0
    }

    fn decode_from(r: &mut Reader) -> Result<FaultRecord> {
        let verdict = verdict_from(r.u8()?)?;
        let request_id = r.array()?;
        let position = r.u64()?;
        let model = r.array()?;
        let head_version = r.array()?;
        let first_layer = r.u32()?;
        let last_layer = r.u32()?;
        let input = match r.u8()? {
            0 => {
                let dtype = Dtype::from_u8(r.u8()?)?;
                let n = r.len(MAX_SHAPE_DIMS, 4, "shape")?;
                let shape = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
                let n = r.len(MAX_INPUT_BYTES, 1, "fault input")?;
                let bytes = r.take(n)?.to_vec();
                FaultInput::Hidden {
                    dtype,
                    shape,
                    bytes,
                }
            }
            1 => {
                let n = r.len(MAX_PREFIX_TOKENS, 4, "token prefix")?;
                let tokens = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
                FaultInput::TokenPrefix { tokens }
            }
            _ => {
                return Err(Error::Malformed {
                    what: "fault record",
                    reason: "unknown input kind",
                });
            }
        };
        let stage = SignedCommitment::decode_from(r)?;
        let checker = SignedCommitment::decode_from(r)?;
        let referee = if r.bool()? {
            Some(SignedCommitment::decode_from(r)?)
        } else {
            None
        };
        let reported_ms = r.u64()?;
        let rec = FaultRecord {
            verdict,
            request_id,
            position,
            model,
            head_version,
            first_layer,
            last_layer,
            input,
            stage,
            checker,
            referee,
            reported_ms,
        };
        rec.input.validate()?;
        Ok(rec)
    }

    /// RT-FAULT-1: the bytes the router signs.
    pub fn signing_bytes(&self, chain_id: &str) -> Vec<u8> {
        signing_bytes(Domain::FaultRecord, chain_id, &self.encode())
    }

    /// RT-FAULT-2 without the router's signature.
    pub fn verify_content(&self, chain_id: &str, tol: Tolerance) -> Result<()> {
        self.input.validate()?;
        let parts: Vec<&SignedCommitment> = [
            Some(&self.stage),
            Some(&self.checker),
            self.referee.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        for p in &parts {
            let c = &p.commitment;
            if c.request_id != self.request_id
                || c.model != self.model
                || c.head_version != self.head_version
                || c.first_layer != self.first_layer
                || c.last_layer != self.last_layer
                || c.chunk.first_token != self.position
            {
                return Err(Error::InconsistentFault("a commitment is to another step"));
            }
            p.verify(chain_id)?;
        }
        let mut nodes: Vec<Address> = parts.iter().map(|p| p.commitment.node).collect();
        nodes.sort();
        nodes.dedup();
        if nodes.len() != parts.len() {
            return Err(Error::InconsistentFault(
                "stage, checker and referee must be different nodes",
            ));
        }
        let recomputed = match &self.referee {
            Some(r) => settle(
                &self.stage.commitment.chunk,
                &self.checker.commitment.chunk,
                &r.commitment.chunk,
                tol,
            ),
            None => crate::spot::first_comparison(
                &self.stage.commitment.chunk,
                &self.checker.commitment.chunk,
                tol,
            )
            .unwrap_or(Settlement::Undecided),
        };
        if recomputed != self.verdict {
            return Err(Error::InconsistentFault(
                "the verdict does not follow from the commitments",
            ));
        }
        Ok(())
    }
}

/// A fault record signed by the router that settled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedFaultRecord {
    pub record: FaultRecord,
    pub reporter_key: PublicKey,
    pub signature: [u8; 64],
}

impl SignedFaultRecord {
    /// RT-FAULT-2; returns the reporter's address.
    pub fn verify(&self, chain_id: &str, tol: Tolerance) -> Result<Address> {
        let reporter =
            Address::from_sec1(&self.reporter_key).ok_or(Error::BadSignature("fault record"))?;
        if !verify_signature(
            &self.reporter_key,
            &self.record.signing_bytes(chain_id),
            &self.signature,
        ) {
            return Err(Error::BadSignature("fault record"));
        }
        self.record.verify_content(chain_id, tol)?;
        Ok(reporter)
    }

    /// Body ‖ reporter key ‖ signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.record.encode();
        out.extend_from_slice(&self.reporter_key);
        out.extend_from_slice(&self.signature);
        out
    }

    /// RT-FAULT-3: refuses non-canonical bytes and anything past the bounds.
    pub fn decode(bytes: &[u8]) -> Result<SignedFaultRecord> {
        let mut r = Reader::new(bytes, "fault record");
        let record = FaultRecord::decode_from(&mut r)?;
        let reporter_key = r.array()?;
        let signature = r.array()?;
        r.finish()?;
        Ok(SignedFaultRecord {
            record,
            reporter_key,
            signature,
        })
    }
}
