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
