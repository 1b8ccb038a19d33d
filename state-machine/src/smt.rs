//! TEMPORARY stand-in (replaced by the real sparse Merkle tree from branch `smt`).
use imbl::OrdMap;
#[derive(Clone, Debug, Default)]
pub struct SparseMerkleTree {
    leaves: OrdMap<[u8; 32], [u8; 32]>,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof;
impl SparseMerkleTree {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn root(&self) -> [u8; 32] {
        let mut all = Vec::new();
        for (k, v) in &self.leaves {
            all.extend_from_slice(k);
            all.extend_from_slice(v);
        }
        crate::crypto::sha3_256(&all)
    }
    pub fn apply(&mut self, updates: impl IntoIterator<Item = ([u8; 32], Option<[u8; 32]>)>) {
        for (k, v) in updates {
            match v {
                Some(v) => self.leaves.insert(k, v),
                None => self.leaves.remove(&k),
            };
        }
    }
    pub fn prove(&self, _path: &[u8; 32]) -> Proof {
        Proof
    }
}
