//! Route planning and failover (spec/inference.md, RT-ROUTE-*, RT-FAIL-*).
//!
//! A route is a sequence of stages, each a node and a contiguous layer
//! range, that covers every layer of the model once and in order; for an
//! MoE model every (layer, expert) is also assigned to a holder. The router
//! sends each stage its input and receives its output (router-centric, as
//! Petals' client), so a stage costs one round trip to the router plus its
//! compute.
//!
//! - **RT-ROUTE-1** Eligible: a candidate built from a live heartbeat
//!   (RT-HB-7) whose node is neither quarantined at `now_ms` (RT-QUAR-2)
//!   nor excluded by the caller. Candidates are sorted and de-duplicated
//!   first, so the plan does not depend on their order.
//! - **RT-ROUTE-2** Stage cost, µs: `rtt_us + weighted(compute_per_layer_us
//!   × layers)`, where `weighted(c) = c × (10⁶ + queue_weight_ppm × load) /
//!   10⁶` and `load = queue_depth + in-flight requests this router assigned
//!   to the node` ([`LoadBook`]); an unmeasured round trip counts as
//!   `unknown_rtt_us`. The route minimises the sum of its stage costs by a
//!   shortest path over layer boundaries `0..=layers` (a DAG: dynamic
//!   programming in boundary order, exact). Ties: fewer stages, then the
//!   lexicographically smallest sequence of `(node, first_layer,
//!   last_layer)`.
//! - **RT-ROUTE-3** If some layer has no eligible dense holder, planning
//!   fails naming the lowest such layer. Otherwise a route always exists.
//! - **RT-ROUTE-4** MoE: each (layer, expert) of each stage goes to the
//!   eligible holder of that expert in that layer with the least `expert
//!   cost = hop + weighted(compute_per_layer_us)`, where `hop` is 0 when the
//!   holder is the layer's stage node and its `rtt_us` otherwise; ties:
//!   lowest address. An expert nobody holds fails naming (layer, expert).
//!   A stage's estimate adds, per layer, the most expensive remote expert
//!   (experts of a layer are dispatched in parallel). Stages are chosen
//!   first, then experts (not jointly).
//! - **RT-ROUTE-5** Load spreading: the router records each planned route
//!   in its [`LoadBook`] until the request ends; every node of a route
//!   counts one in-flight request, which raises its cost for the next plan,
//!   so equal replicas alternate.
//! - **RT-FAIL-1** Failover of node `f`: `f` is excluded from the new plan
//!   (all its stages and expert assignments).
//! - **RT-FAIL-2** Each stage on `f` is replaced by the cheapest eligible
//!   dense holder of its whole range (RT-ROUTE-2 cost; ties lowest address);
//!   other stages keep their node, range and expert assignments (except
//!   assignments on `f`, re-chosen by RT-ROUTE-4), so their caches stay.
//! - **RT-FAIL-3** If a stage on `f` has no such holder, the suffix from
//!   its first layer is re-planned by RT-ROUTE-2; the prefix is kept.
//! - **RT-FAIL-4** `rebuilt` lists the new plan's stages whose `(node,
//!   first_layer, last_layer)` was not in the old plan: their caches are
//!   rebuilt by replaying the request's inputs (the runtime's part).

use crate::heartbeat::HeartbeatTable;
use crate::quarantine::Quarantine;
use crate::{Error, PPM, Result};
use blyan_state_machine::types::{Address, Hash32};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// RT-ROUTE-1: most layers a model may have.
pub const MAX_LAYERS: u32 = 4096;
/// RT-ROUTE-4: most experts per MoE layer.
pub const MAX_EXPERTS_PER_LAYER: u16 = 1024;
/// RT-ROUTE-2: default round trip assumed for a node never measured.
pub const DEFAULT_UNKNOWN_RTT_US: u64 = 50_000;

/// What is being routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub model: Hash32,
    pub layers: u32,
    /// Experts per layer; 0 for a dense model.
    pub experts_per_layer: u16,
}

impl ModelShape {
    pub fn validate(&self) -> Result<()> {
        if self.layers == 0 || self.layers > MAX_LAYERS {
            return Err(Error::InvalidShape("layers must be in 1..=4096"));
        }
        if self.experts_per_layer > MAX_EXPERTS_PER_LAYER {
            return Err(Error::InvalidShape("at most 1024 experts per layer"));
        }
        Ok(())
    }
}

/// One holding of one node, with what the planner knows about the node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    pub node: Address,
    pub first_layer: u32,
    /// Inclusive.
    pub last_layer: u32,
    /// Can serve as a stage (holds the layers' non-expert weights).
    pub dense: bool,
    /// Experts held in each layer of the range, strictly increasing.
    pub experts: Vec<u16>,
    /// Measured round trip from this router, µs.
    pub rtt_us: u64,
    /// The node's measured compute per token divided by the layers it
    /// holds of this model (rounded up), µs.
    pub compute_per_layer_us: u64,
    /// From its heartbeat.
    pub queue_depth: u32,
}

impl Candidate {
    fn covers(&self, layer: u32) -> bool {
        self.first_layer <= layer && layer <= self.last_layer
    }
    fn holds_expert(&self, layer: u32, expert: u16) -> bool {
        self.covers(layer) && self.experts.binary_search(&expert).is_ok()
    }
}

/// RT-ROUTE-2 settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Weight of each queued or in-flight request on a node's compute.
    pub queue_weight_ppm: u32,
    pub unknown_rtt_us: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            queue_weight_ppm: PPM,
            unknown_rtt_us: DEFAULT_UNKNOWN_RTT_US,
        }
    }
}

/// RT-ROUTE-5: requests this router has in flight per node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBook {
    inflight: BTreeMap<Address, u32>,
}

impl LoadBook {
    pub fn inflight(&self, node: &Address) -> u32 {
        self.inflight.get(node).copied().unwrap_or(0)
    }
    /// Records a planned route: one in-flight request per node in it.
    pub fn assign(&mut self, plan: &Plan) {
        for n in plan.nodes() {
            *self.inflight.entry(n).or_default() += 1;
        }
    }
    /// Ends a request planned with `plan` (entries at zero are removed, so
    /// the book holds only nodes with requests in flight).
    pub fn release(&mut self, plan: &Plan) {
        for n in plan.nodes() {
            if let Some(c) = self.inflight.get_mut(&n) {
                *c -= 1;
                if *c == 0 {
                    self.inflight.remove(&n);
                }
            }
        }
    }
}

/// A stage's MoE expert placement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpertAssignment {
    pub layer: u32,
    pub expert: u16,
    pub node: Address,
}

/// One hop of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub node: Address,
    pub first_layer: u32,
    /// Inclusive.
    pub last_layer: u32,
    /// MoE only, in (layer, expert) order.
    pub experts: Vec<ExpertAssignment>,
    pub estimated_us: u64,
}

/// A route for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub model: Hash32,
    pub stages: Vec<Stage>,
    pub estimated_us: u64,
}

impl Plan {
    /// Every node the plan uses (stages and experts), in address order.
    pub fn nodes(&self) -> BTreeSet<Address> {
        let mut out = BTreeSet::new();
        for s in &self.stages {
            out.insert(s.node);
            out.extend(s.experts.iter().map(|e| e.node));
        }
        out
    }
}

/// The result of a failover (RT-FAIL-*).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    pub plan: Plan,
    /// RT-FAIL-4: indices of stages whose caches must be rebuilt.
    pub rebuilt: Vec<usize>,
}

/// RT-ROUTE-1: candidates for `model` from the live heartbeats, with the
/// router's measured round trips (`rtt_us`; a node missing from it counts
/// as `config.unknown_rtt_us`). Quarantine and exclusions are applied by
/// [`Planner::new`].
pub fn candidates_from_table(
    table: &HeartbeatTable,
    model: &Hash32,
    now_ms: u64,
    rtt_us: &BTreeMap<Address, u64>,
    config: &PlanConfig,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (node, entry) in table.iter_live(now_ms) {
        let hb = &entry.heartbeat;
        let held: Vec<_> = hb.holdings.iter().filter(|h| &h.model == model).collect();
        let layers: u64 = held.iter().map(|h| u64::from(h.layer_count())).sum();
        if layers == 0 {
            continue;
        }
        let compute_per_layer_us = hb.compute_per_token_us.div_ceil(layers);
        for h in held {
            out.push(Candidate {
                node: *node,
                first_layer: h.first_layer,
                last_layer: h.last_layer,
                dense: h.dense,
                experts: h.experts.clone(),
                rtt_us: rtt_us.get(node).copied().unwrap_or(config.unknown_rtt_us),
                compute_per_layer_us,
                queue_depth: hb.queue_depth,
            });
        }
    }
    out
}

/// A stage chosen on the shortest path.
#[derive(Clone, Copy, Debug)]
struct Choice {
    cand: usize,
    first: u32,
    last: u32,
    cost: u64,
}

#[derive(Clone, Debug)]
struct Path {
    cost: u64,
    stages: Vec<Choice>,
}

/// Plans routes over a fixed set of eligible candidates (RT-ROUTE-*).
#[derive(Clone, Debug)]
pub struct Planner<'a> {
    shape: ModelShape,
    candidates: Vec<Candidate>,
    load: &'a LoadBook,
    config: PlanConfig,
}

impl<'a> Planner<'a> {
    /// RT-ROUTE-1: keeps the candidates that are eligible at `now_ms`.
    pub fn new(
        shape: ModelShape,
        candidates: &[Candidate],
        quarantine: &Quarantine,
        excluded: &BTreeSet<Address>,
        now_ms: u64,
        load: &'a LoadBook,
        config: PlanConfig,
    ) -> Result<Self> {
        shape.validate()?;
        let mut kept: Vec<Candidate> = candidates
            .iter()
            .filter(|c| !quarantine.is_quarantined(&c.node, now_ms) && !excluded.contains(&c.node))
            .cloned()
            .collect();
        for c in &kept {
            if c.first_layer > c.last_layer || c.experts.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::InvalidHolding(
                    "candidate range reversed or experts not strictly increasing",
                ));
            }
        }
        kept.sort();
        kept.dedup();
        Ok(Planner {
            shape,
            candidates: kept,
            load,
            config,
        })
    }

    fn without(&self, node: Address) -> Planner<'a> {
        Planner {
            shape: self.shape.clone(),
            candidates: self
                .candidates
                .iter()
                .filter(|c| c.node != node)
                .cloned()
                .collect(),
            load: self.load,
            config: self.config.clone(),
        }
    }

    fn weighted(&self, compute_us: u64, c: &Candidate) -> u64 {
        let load = u128::from(c.queue_depth) + u128::from(self.load.inflight(&c.node));
        let factor = u128::from(PPM) + u128::from(self.config.queue_weight_ppm) * load;
        let v = u128::from(compute_us) * factor / u128::from(PPM);
        u64::try_from(v).unwrap_or(u64::MAX)
    }

    /// RT-ROUTE-2: the cost of running layers `first..=last` on `c`.
    pub fn stage_cost(&self, c: &Candidate, first: u32, last: u32) -> u64 {
        let compute = c
            .compute_per_layer_us
            .saturating_mul(u64::from(last - first + 1));
        c.rtt_us.saturating_add(self.weighted(compute, c))
    }

    fn expert_cost(&self, c: &Candidate, stage_node: &Address) -> u64 {
        let hop = if &c.node == stage_node { 0 } else { c.rtt_us };
        hop.saturating_add(self.weighted(c.compute_per_layer_us, c))
    }

    fn key<'p>(&'p self, p: &'p Path) -> impl Iterator<Item = (Address, u32, u32)> + 'p {
        p.stages
            .iter()
            .map(|s| (self.candidates[s.cand].node, s.first, s.last))
    }

    /// RT-ROUTE-2's order on paths.
    fn cmp_paths(&self, a: &Path, b: &Path) -> Ordering {
        a.cost
            .cmp(&b.cost)
            .then(a.stages.len().cmp(&b.stages.len()))
            .then_with(|| self.key(a).cmp(self.key(b)))
    }

    /// RT-ROUTE-2, RT-ROUTE-3: the best stages covering `start..layers`.
    fn best_path(&self, start: u32) -> Result<Path> {
        let n = self.shape.layers;
        let mut best: Vec<Option<Path>> = vec![None; (n - start + 1) as usize];
        best[0] = Some(Path {
            cost: 0,
            stages: Vec::new(),
        });
        for b in start..n {
            let Some(here) = best[(b - start) as usize].clone() else {
                continue;
            };
            for (i, c) in self.candidates.iter().enumerate() {
                if !c.dense || !c.covers(b) {
                    continue;
                }
                for last in b..=c.last_layer.min(n - 1) {
                    let cost = self.stage_cost(c, b, last);
                    let total = here.cost.saturating_add(cost);
                    let slot = &best[(last + 1 - start) as usize];
                    if let Some(old) = slot
                        && (total, here.stages.len() + 1) > (old.cost, old.stages.len())
                    {
                        continue;
                    }
                    let mut stages = here.stages.clone();
                    stages.push(Choice {
                        cand: i,
                        first: b,
                        last,
                        cost,
                    });
                    let path = Path {
                        cost: total,
                        stages,
                    };
                    let slot = &mut best[(last + 1 - start) as usize];
                    let better = match slot {
                        None => true,
                        Some(old) => self.cmp_paths(&path, old) == Ordering::Less,
                    };
                    if better {
                        *slot = Some(path);
                    }
                }
            }
        }
        if let Some(p) = best.pop().flatten() {
            return Ok(p);
        }
        let layer = (start..n)
            .find(|l| !self.candidates.iter().any(|c| c.dense && c.covers(*l)))
            .expect("RT-ROUTE-3: a route exists when every layer is covered");
        Err(Error::UncoveredLayer { layer })
    }

    /// RT-ROUTE-4: the holder of `expert` in `layer` for a stage on
    /// `stage_node`, with its cost.
    fn assign_expert(
        &self,
        layer: u32,
        expert: u16,
        stage_node: &Address,
    ) -> Result<(Address, u64)> {
        self.candidates
            .iter()
            .filter(|c| c.holds_expert(layer, expert))
            .map(|c| (self.expert_cost(c, stage_node), c.node))
            .min()
            .map(|(cost, node)| (node, cost))
            .ok_or(Error::UncoveredExpert { layer, expert })
    }

    /// RT-ROUTE-4: fills (or, with `keep`, completes) a stage's experts and
    /// its estimate. `keep` holds assignments to keep (RT-FAIL-2).
    fn finish_stage(
        &self,
        node: Address,
        first: u32,
        last: u32,
        dense_cost: u64,
        keep: &[ExpertAssignment],
    ) -> Result<Stage> {
        let mut experts = Vec::new();
        let mut estimated_us = dense_cost;
        if self.shape.experts_per_layer > 0 {
            for layer in first..=last {
                let mut slowest_remote = 0u64;
                for expert in 0..self.shape.experts_per_layer {
                    let kept = keep
                        .iter()
                        .find(|a| a.layer == layer && a.expert == expert)
                        .and_then(|a| {
                            self.candidates
                                .iter()
                                .filter(|c| c.node == a.node && c.holds_expert(layer, expert))
                                .map(|c| (c.node, self.expert_cost(c, &node)))
                                .min_by_key(|(_, cost)| *cost)
                        });
                    let (holder, cost) = match kept {
                        Some(k) => k,
                        None => self.assign_expert(layer, expert, &node)?,
                    };
                    if holder != node {
                        slowest_remote = slowest_remote.max(cost);
                    }
                    experts.push(ExpertAssignment {
                        layer,
                        expert,
                        node: holder,
                    });
                }
                estimated_us = estimated_us.saturating_add(slowest_remote);
            }
        }
        Ok(Stage {
            node,
            first_layer: first,
            last_layer: last,
            experts,
            estimated_us,
        })
    }

    fn to_plan(&self, stages: Vec<Stage>) -> Plan {
        let estimated_us = stages
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.estimated_us));
        Plan {
            model: self.shape.model,
            stages,
            estimated_us,
        }
    }

    /// RT-ROUTE-2..4: the best route over every layer.
    pub fn plan(&self) -> Result<Plan> {
        let path = self.best_path(0)?;
        let stages = path
            .stages
            .iter()
            .map(|s| self.finish_stage(self.candidates[s.cand].node, s.first, s.last, s.cost, &[]))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.to_plan(stages))
    }

    /// RT-FAIL-1..4: the plan with `failed` replaced.
    pub fn failover(&self, plan: &Plan, failed: Address) -> Result<Failover> {
        if !plan.nodes().contains(&failed) {
            return Err(Error::NotInPlan(failed));
        }
        let p = self.without(failed);
        let mut stages = Vec::new();
        let mut replan_from = None;
        for s in &plan.stages {
            let keep: Vec<ExpertAssignment> = s
                .experts
                .iter()
                .filter(|a| a.node != failed)
                .cloned()
                .collect();
            if s.node != failed {
                let c = p
                    .candidates
                    .iter()
                    .filter(|c| {
                        c.node == s.node
                            && c.dense
                            && c.covers(s.first_layer)
                            && c.covers(s.last_layer)
                    })
                    .min_by_key(|c| p.stage_cost(c, s.first_layer, s.last_layer));
                let Some(c) = c else {
                    // The stage's own holder is no longer eligible here.
                    replan_from = Some(s.first_layer);
                    break;
                };
                let cost = p.stage_cost(c, s.first_layer, s.last_layer);
                stages.push(p.finish_stage(s.node, s.first_layer, s.last_layer, cost, &keep)?);
                continue;
            }
            let best = p
                .candidates
                .iter()
                .filter(|c| c.dense && c.covers(s.first_layer) && c.covers(s.last_layer))
                .map(|c| (p.stage_cost(c, s.first_layer, s.last_layer), c.node))
                .min();
            match best {
                Some((cost, node)) => {
                    stages.push(p.finish_stage(node, s.first_layer, s.last_layer, cost, &[])?)
                }
                None => {
                    replan_from = Some(s.first_layer);
                    break;
                }
            }
        }
        if let Some(start) = replan_from {
            let path = p.best_path(start)?;
            for s in &path.stages {
                stages.push(p.finish_stage(
                    p.candidates[s.cand].node,
                    s.first,
                    s.last,
                    s.cost,
                    &[],
                )?);
            }
        }
        let old: BTreeSet<(Address, u32, u32)> = plan
            .stages
            .iter()
            .map(|s| (s.node, s.first_layer, s.last_layer))
            .collect();
        let rebuilt = stages
            .iter()
            .enumerate()
            .filter(|(_, s)| !old.contains(&(s.node, s.first_layer, s.last_layer)))
            .map(|(i, _)| i)
            .collect();
        Ok(Failover {
            plan: p.to_plan(stages),
            rebuilt,
        })
    }
}
