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
