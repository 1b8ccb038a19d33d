//! POL-TRAIN-3 on a Mixture-of-Experts model: an expert and a router train
//! alone, fully or with LoRA, and their deltas apply only to their target.

use blyan_gpu::blocks::split;
use blyan_gpu::pol::{Target, TrainOptions, Weights, evaluate_delta, train_target, windows};

use crate::common::{model_dir, temp_dir};

fn moe_weights() -> Weights {
    let out = temp_dir("pol-moe");
    split(&model_dir("qwen3_moe"), &out).expect("split");
    Weights::load(Some(&out)).expect("block directory")
}

/// A short repeating sequence of token ids inside the fixture's vocabulary.
fn tokens(vocab: i64) -> Vec<i64> {
    (0..2_000).map(|i| (i * 7 % 23) % vocab).collect()
}

#[test]
fn pol_train_3_an_expert_and_a_router_train_alone_and_apply_only_to_themselves() {
    let w = moe_weights();
    let data = tokens(w.cfg.vocab_size);
    let ws = windows(&data, &[0, 300, 900], 48).expect("windows");
    let expert = Target::Expert {
        layer: 0,
        expert: 3,
    };
    for (target, lora_rank) in [(expert, None), (Target::Router(2), None), (expert, Some(2))] {
        let opts = TrainOptions {
            steps: 25,
            batch: 4,
            seq_tokens: 48,
            learning_rate: 1e-2,
            lora_rank,
            ..TrainOptions::default()
        };
        let trained = train_target(&w, target, &data, &opts, |_| {})
            .unwrap_or_else(|e| panic!("{target} (LoRA {lora_rank:?}): {e}"));
        let names = w.target_names(target).expect("target");
        let updated: Vec<&String> = trained.updates.keys().collect();
        assert!(!updated.is_empty());
        assert!(
            updated.iter().all(|n| names.contains(n)),
            "{target}: {updated:?} not all in {names:?}"
        );
        for (n, u) in &trained.updates {
            assert!(u.abs().max().double_value(&[]) > 0.0, "{n} did not move");
        }
        let payload = trained.compress(250_000).expect("compress");
        let e = evaluate_delta(&w, target, &[], &payload, &ws).expect("evaluate");
        assert!(
            e.loss_micronats < e.head_loss_micronats,
            "{target} (LoRA {lora_rank:?}): {e:?}"
        );
        // Claimed for another target, the same payload is worth nothing.
        let other = evaluate_delta(&w, Target::Layer(0), &[], &payload, &ws).expect("evaluate");
        assert_eq!(other.loss_micronats, u64::MAX, "{target}");
    }
    // POL-EVAL-8 on MoE layers: from the layer up, the whole model's bits.
    let whole = blyan_gpu::pol::mean_loss_micronats(&w.model().expect("model"), &ws).expect("loss");
    for layer in 0..3 {
        let inputs = blyan_gpu::pol::LayerInputs::compute(&w, layer, &ws).expect("inputs");
        assert_eq!(
            inputs.mean_loss_micronats(&w).expect("loss"),
            whole,
            "layer {layer}"
        );
    }
    // A router's tensor is one matrix; a dense layer has none.
    assert_eq!(w.target_names(Target::Router(2)).expect("router").len(), 1);
    assert!(
        w.target_names(Target::Router(1)).is_err(),
        "layer 1 is dense"
    );
}
