//! What a simulation runs (SIM-CFG-*). Probabilities are integers in parts
//! per million so a configuration prints and compares exactly.

/// Network and node faults, each drawn from the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults {
    /// One-way latency: `mean ± jitter` (triangular: the sum of two uniform
    /// draws), plus with `tail_ppm` an extra uniform `0..tail_ms` (slow links).
    pub latency_mean_ms: u64,
    pub latency_jitter_ms: u64,
    pub tail_ppm: u32,
    pub tail_ms: u64,
    /// Per message and destination.
    pub loss_ppm: u32,
    pub duplicate_ppm: u32,
    /// The nemesis acts every `nemesis_interval_ms` (± half) during the
    /// safety phase, picking one of the enabled faults below.
    pub nemesis_interval_ms: u64,
    pub partitions: bool,
    pub asymmetric_partitions: bool,
    /// FoundationDB's swizzle-clog: clog nodes one by one, unclog in random order.
    pub swizzle: bool,
    pub crashes: bool,
    /// Each node's clock is offset by a draw in `±clock_skew_max_ms`.
    pub clock_skew_max_ms: u64,
    /// Store writes fail (before or after the write) with this probability;
    /// the node halts and is restarted later.
    pub store_error_ppm: u32,
    pub byzantine: Byzantine,
}

/// What Byzantine validators do with their outgoing messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Byzantine {
    /// A vote is also sent, to half the peers, with a conflicting value.
    pub equivocate_ppm: u32,
    /// An own proposal is also sent, to half the peers, naming a conflicting
    /// valid block (validly signed: an equivocating proposer).
    pub equivocate_proposal_ppm: u32,
    /// An own vote is not sent at all.
    pub withhold_ppm: u32,
    /// A message's signature is corrupted.
    pub bad_signature_ppm: u32,
    /// Random bytes instead of a message.
    pub garbage_ppm: u32,
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            latency_mean_ms: 50,
            latency_jitter_ms: 20,
            tail_ppm: 0,
            tail_ms: 0,
            loss_ppm: 0,
            duplicate_ppm: 0,
            nemesis_interval_ms: 0,
            partitions: false,
            asymmetric_partitions: false,
            swizzle: false,
            crashes: false,
            clock_skew_max_ms: 0,
            store_error_ppm: 0,
            byzantine: Byzantine {
                equivocate_ppm: 0,
                equivocate_proposal_ppm: 0,
                withhold_ppm: 0,
                bad_signature_ppm: 0,
                garbage_ppm: 0,
            },
        }
    }

    /// Every fault on.
    pub fn all() -> Faults {
        Faults {
            latency_mean_ms: 50,
            latency_jitter_ms: 20,
            tail_ppm: 20_000,
            tail_ms: 1_000,
            loss_ppm: 20_000,
            duplicate_ppm: 20_000,
            nemesis_interval_ms: 4_000,
            partitions: true,
            asymmetric_partitions: true,
            swizzle: true,
            crashes: true,
            clock_skew_max_ms: 300,
            store_error_ppm: 500,
            byzantine: Byzantine {
                equivocate_ppm: 200_000,
                equivocate_proposal_ppm: 500_000,
                withhold_ppm: 200_000,
                bad_signature_ppm: 50_000,
                garbage_ppm: 50_000,
            },
        }
    }

    /// Only the network misbehaves (no crashes, no store errors).
    pub fn net() -> Faults {
        Faults {
            crashes: false,
            store_error_ppm: 0,
            ..Faults::all()
        }
    }

    pub fn parse(name: &str) -> Option<Faults> {
        match name {
            "none" => Some(Faults::none()),
            "net" => Some(Faults::net()),
            "all" => Some(Faults::all()),
            _ => None,
        }
    }
}

/// SIM-CFG-1: one simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    pub seed: u64,
    pub validators: usize,
    /// The Byzantine ones are the last `byzantine` validators.
    pub byzantine: usize,
    pub faults: Faults,
    /// The safety phase (faults on).
    pub duration_ms: u64,
    /// The liveness phase bound: after healing, every honest node must reach
    /// the same height and state root within this much simulated time.
    pub liveness_bound_ms: u64,
    pub block_interval_ms: u64,
    /// Client actions per simulated second.
    pub client_rate_per_s: u64,
    /// A deliberate consensus bug (feature `mutants`).
    pub mutant: Option<String>,
    /// SIM-WL-2: validators (the last ones) that reveal false losses in
    /// their PoL attestations; by default the Byzantine ones.
    pub pol_liars: usize,
    /// SIM-FID-1/2: memoise signature verification and block application
    /// across the simulated nodes (blyan_state_machine::memo); `--no-memo`
    /// turns them off.
    pub memo: bool,
}

impl SimConfig {
    pub fn new(seed: u64, validators: usize, byzantine: usize, faults: Faults) -> SimConfig {
        SimConfig {
            seed,
            validators,
            byzantine,
            faults,
            duration_ms: 60_000,
            liveness_bound_ms: 60_000,
            block_interval_ms: 2_000,
            client_rate_per_s: 5,
            mutant: None,
            pol_liars: byzantine,
            memo: true,
        }
    }

    /// The flags that reproduce this run with `blyan-sim run`.
    pub fn command(&self, faults_name: &str) -> String {
        let mut cmd = format!(
            "sim/blyan-sim run --seed {} --validators {} --byzantine {} --faults {} --duration {}s --liveness {}s --block-interval {}ms --rate {}",
            self.seed,
            self.validators,
            self.byzantine,
            faults_name,
            self.duration_ms / 1_000,
            self.liveness_bound_ms / 1_000,
            self.block_interval_ms,
            self.client_rate_per_s,
        );
        if let Some(m) = &self.mutant {
            cmd.push_str(&format!(" --mutant {m}"));
        }
        if self.pol_liars != self.byzantine {
            cmd.push_str(&format!(" --pol-liars {}", self.pol_liars));
        }
        if !self.memo {
            cmd.push_str(" --no-memo");
        }
        cmd
    }
}
