//! A model split into two pipeline stages gives the whole model's logits.

use blyan_gpu::config::ModelConfig;
use blyan_gpu::model::{KvCache, LayerRange, Qwen3};
use blyan_gpu::stage::{StageInput, StageOutput};
use blyan_gpu::weights::SafetensorsDir;
use tch::{Device, Kind};

use crate::common::{ids, model, model_dir};

#[test]
fn two_stages_with_caches_match_the_whole_model() {
    let name = "qwen3_single";
    let dir = model_dir(name);
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let src = SafetensorsDir::open(&dir).expect("open");
    let load = |range| Qwen3::load(&cfg, &src, range, Device::Cpu, Kind::Float).expect("load");
    let first = load(LayerRange {
        start: 0,
        end: 2,
        embed: true,
        head: false,
    });
    let second = load(LayerRange {
        start: 2,
        end: 3,
        embed: false,
        head: true,
    });
    assert!(first.lm_head.is_none() && second.embed.is_none() && second.layers.len() == 1);
    let whole = load(LayerRange::full(&cfg));
    let input = ids(&model(name)["input_ids"]);
    let expected = whole.logits(&input).expect("logits");
    let (mut c1, mut c2) = (KvCache::new(), KvCache::new());
    // Prefill 6 tokens, then one token at a time through both stages.
    let mut rows = Vec::new();
    for chunk in [&input[..6], &input[6..7], &input[7..8], &input[8..]] {
        let StageOutput::Hidden(h) = first
            .run_stage(&StageInput::Ids(vec![chunk.to_vec()]), &mut c1)
            .expect("stage 1")
        else {
            panic!("stage 1 must return hidden states");
        };
        assert_eq!(h.dtype, "f32");
        assert_eq!(h.bytes.len(), chunk.len() * 64 * 4);
        let StageOutput::Logits(l) = second
            .run_stage(&StageInput::Hidden(h), &mut c2)
            .expect("stage 2")
        else {
            panic!("stage 2 must return logits");
        };
        rows.push(l.squeeze_dim(0));
    }
    let got = tch::Tensor::cat(&rows, 0);
    let d = (got - expected).abs().max().double_value(&[]);
    assert!(d <= 1e-5, "staged logits differ by {d}");
    // A stage that holds no embedding refuses ids.
    assert!(
        second
            .run_stage(&StageInput::Ids(vec![vec![1]]), &mut KvCache::new())
            .is_err()
    );
}

/// RT-PIPE-9: decode steps of several sessions (different prompts, so
/// different cache lengths) run as one batch give each session's logits of
/// one-at-a-time steps, within rounding; for the dense embedded model and
/// the Qwen3-MoE one, through two stages.
#[test]
fn rt_pipe_9_batched_decode_steps_match_one_at_a_time() {
    use blyan_gpu::default_model::{
        DEFAULT_SEED, MOE_SEED, default_config, moe_config, random_weights,
    };
    use blyan_gpu::model::MoeContext;
    for (cfg, seed) in [(default_config(), DEFAULT_SEED), (moe_config(), MOE_SEED)] {
        let weights = random_weights(&cfg, seed);
        let load = |start, end| {
            Qwen3::load(
                &cfg,
                &weights,
                LayerRange {
                    start,
                    end,
                    embed: start == 0,
                    head: end == cfg.num_hidden_layers,
                },
                Device::Cpu,
                Kind::Float,
            )
            .expect("load")
        };
        let (first, second) = (load(0, 2), load(2, 4));
        let prompts: [&[i64]; 3] = [&[5, 6, 7], &[9, 10, 11, 12, 13], &[42]];
        // Each session: a prefill, then one token at a time.
        // Every session's caches after its prefill.
        let prefilled = || -> Vec<(KvCache, KvCache)> {
            prompts
                .iter()
                .map(|p| {
                    let (mut a, mut b) = (KvCache::new(), KvCache::new());
                    let StageOutput::Hidden(h) = first
                        .run_stage(&StageInput::Ids(vec![p.to_vec()]), &mut a)
                        .unwrap()
                    else {
                        panic!("hidden");
                    };
                    second.run_stage(&StageInput::Hidden(h), &mut b).unwrap();
                    (a, b)
                })
                .collect()
        };
        let mut single = prefilled();
        let mut batched = prefilled();
        let mut worst = 0f64;
        let mut exact = true;
        for step in 0..4i64 {
            let tokens: Vec<i64> = (0..3).map(|j| 20 + 7 * j + step).collect();
            // One at a time.
            let want: Vec<tch::Tensor> = tokens
                .iter()
                .zip(single.iter_mut())
                .map(|(&t, (a, b))| {
                    let StageOutput::Hidden(h) =
                        first.run_stage(&StageInput::Ids(vec![vec![t]]), a).unwrap()
                    else {
                        panic!("hidden");
                    };
                    match second.run_stage(&StageInput::Hidden(h), b).unwrap() {
                        StageOutput::Logits(l) => l,
                        StageOutput::Hidden(_) => panic!("logits"),
                    }
                })
                .collect();
            // As one batch per stage.
            let inputs: Vec<StageInput> = tokens
                .iter()
                .map(|&t| StageInput::Ids(vec![vec![t]]))
                .collect();
            let (mut c1, mut c2): (Vec<&mut KvCache>, Vec<&mut KvCache>) =
                batched.iter_mut().map(|(a, b)| (a, b)).unzip();
            let hidden = first
                .run_stage_batch(&inputs, &mut c1, &mut MoeContext::default())
                .unwrap();
            let hidden: Vec<StageInput> = hidden
                .into_iter()
                .map(|o| match o {
                    StageOutput::Hidden(h) => StageInput::Hidden(h),
                    StageOutput::Logits(_) => panic!("hidden"),
                })
                .collect();
            let got = second
                .run_stage_batch(&hidden, &mut c2, &mut MoeContext::default())
                .unwrap();
            for (w, g) in want.iter().zip(&got) {
                let StageOutput::Logits(g) = g else {
                    panic!("logits")
                };
                let g = g.view_as(w);
                exact &= w.equal(&g);
                worst = worst.max((w - &g).abs().max().double_value(&[]));
            }
        }
        for (s, b) in single.iter().zip(&batched) {
            assert_eq!((s.0.len, s.1.len), (b.0.len, b.1.len), "cache lengths");
        }
        assert!(worst <= 1e-5, "batched logits differ by {worst}");
        eprintln!("batched decode: max |difference| {worst:e}, bit-identical: {exact}");
    }
}
