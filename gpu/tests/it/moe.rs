//! MoE expert subsets: a node holding some experts computes their share.

use blyan_gpu::GpuError;
use blyan_gpu::config::ModelConfig;
use blyan_gpu::model::{LayerRange, Qwen3};
use blyan_gpu::weights::SafetensorsDir;
use tch::{Device, Kind, Tensor};

use crate::common::model_dir;

fn load(experts: Option<&[i64]>) -> Qwen3 {
    let dir = model_dir("qwen3_moe");
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let src = SafetensorsDir::open(&dir).expect("open");
    Qwen3::load_experts(
        &cfg,
        &src,
        LayerRange::full(&cfg),
        experts,
        Device::Cpu,
        Kind::Float,
    )
    .expect("load")
}

#[test]
fn expert_subsets_add_up_to_the_whole_layer() {
    let full = load(None);
    let low = load(Some(&[0, 1, 2, 3]));
    let high = load(Some(&[4, 5, 6, 7]));
    tch::manual_seed(5);
    let h = Tensor::randn([6, 64], (Kind::Float, Device::Cpu));
    let whole = full.moe_partial(0, &h, None).expect("whole");
    let a = low.moe_partial(0, &h, Some(&[0, 1, 2, 3])).expect("low");
    let b = high.moe_partial(0, &h, Some(&[4, 5, 6, 7])).expect("high");
    let d = (whole - (a + b)).abs().max().double_value(&[]);
    assert!(d < 1e-6, "partial sums differ by {d}");
    // Layer 1 is dense (mlp_only_layers).
    assert!(full.moe_partial(1, &h, None).is_err());
}

#[test]
fn routing_to_an_expert_not_held_is_an_error() {
    let partial = load(Some(&[0]));
    let err = partial.logits(&[1, 2, 3, 4, 5]).expect_err("must fail");
    assert!(matches!(err, GpuError::ExpertNotHeld { .. }), "{err}");
}

#[test]
fn gpt_oss_expert_subsets_add_up() {
    use blyan_gpu::config::ModelConfig;
    use blyan_gpu::model::{LayerRange, Qwen3};
    use blyan_gpu::weights::SafetensorsDir;
    let dir = crate::common::model_dir("gpt_oss_mxfp4");
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let src = SafetensorsDir::open(&dir).expect("open");
    let load = |keep: Option<&[i64]>| {
        Qwen3::load_experts(
            &cfg,
            &src,
            LayerRange::full(&cfg),
            keep,
            Device::Cpu,
            Kind::Float,
        )
        .expect("load")
    };
    let (full, a, b) = (load(None), load(Some(&[0, 2])), load(Some(&[1, 3])));
    tch::manual_seed(3);
    let h = tch::Tensor::randn([5, 64], (Kind::Float, Device::Cpu));
    let whole = full.moe_partial(1, &h, None).expect("whole");
    let parts = a.moe_partial(1, &h, Some(&[0, 2])).expect("a")
        + b.moe_partial(1, &h, Some(&[1, 3])).expect("b");
    let d = (whole - parts).abs().max().double_value(&[]);
    assert!(d < 1e-5, "GPT-OSS partial expert sums differ by {d}");
}

/// RT-PIPE-8: a stage's calls for experts it does not hold, answered from
/// another instance's bank.
struct Elsewhere {
    bank: blyan_gpu::model::ExpertBank,
    calls: usize,
}

impl blyan_gpu::model::RemoteExperts for Elsewhere {
    fn compute(&mut self, layer: i64, work: Vec<(i64, Tensor)>) -> blyan_gpu::Result<Vec<Tensor>> {
        self.calls += 1;
        work.iter()
            .map(|(e, rows)| self.bank.forward(layer, *e, rows))
            .collect()
    }
}

#[test]
fn rt_pipe_8_experts_held_elsewhere_give_the_bits_of_one_process() {
    use blyan_gpu::default_model::{MOE_SEED, moe_config, random_weights};
    use blyan_gpu::model::{KvCache, MoeContext};
    let cfg = moe_config();
    let weights = random_weights(&cfg, MOE_SEED);
    let load = |keep: Option<&[i64]>| {
        Qwen3::load_experts(
            &cfg,
            &weights,
            LayerRange::full(&cfg),
            keep,
            Device::Cpu,
            Kind::Float,
        )
        .expect("load")
    };
    let (full, low, high) = (
        load(None),
        load(Some(&[0, 1, 2, 3])),
        load(Some(&[4, 5, 6, 7])),
    );
    let ids: Vec<i64> = b"experts on other nodes"
        .iter()
        .map(|&b| i64::from(b))
        .collect();
    let want = full.logits(&ids).expect("one process");

    let mut remote = Elsewhere {
        bank: high.expert_bank(),
        calls: 0,
    };
    let mut moe = MoeContext {
        remote: Some(&mut remote),
        used: Default::default(),
    };
    let x = low
        .embed(&Tensor::from_slice(&ids).view([1, ids.len() as i64]))
        .expect("embed");
    let h = low
        .forward_layers_moe(&x, &mut KvCache::new(), &mut moe)
        .expect("spread experts");
    let got = low.head(&h).expect("head");
    let used = std::mem::take(&mut moe.used);
    drop(moe);
    let got = got.view_as(&want);
    assert!(
        want.equal(&got),
        "logits differ by {}",
        (&want - &got).abs().max().double_value(&[])
    );
    // Every layer sent work away, and both halves served tokens.
    assert_eq!(remote.calls, 4, "one call per MoE layer");
    assert!(used.iter().any(|&(_, e)| e < 4) && used.iter().any(|&(_, e)| e >= 4));
    assert!(
        used.iter()
            .all(|&(l, e)| (0..4).contains(&l) && (0..8).contains(&e))
    );

    // Without anyone to ask, an expert not held is an error, not a guess.
    let err = low.logits(&ids).expect_err("experts 4..8 are not held");
    assert!(matches!(err, GpuError::ExpertNotHeld { .. }), "{err}");
    // A bank refuses experts it does not hold and rows of the wrong width.
    let bank = low.expert_bank();
    assert!(bank.holds(0, 3) && !bank.holds(0, 4) && !bank.holds(9, 0));
    let rows = Tensor::zeros([2, 128], (Kind::Float, Device::Cpu));
    assert!(bank.forward(0, 4, &rows).is_err());
    assert!(
        bank.forward(0, 3, &Tensor::zeros([2, 7], (Kind::Float, Device::Cpu)))
            .is_err()
    );
    assert_eq!(
        bank.forward(0, 3, &rows).expect("held").size(),
        vec![2, 128]
    );
}
