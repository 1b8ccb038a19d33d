//! Content-addressed blocks: split, reload, verify.

use blyan_gpu::blocks::{BlockStore, cid_v1_raw, sha3_hex, split};
use blyan_gpu::{GpuError, LoadedModel};
use tch::{Device, Kind};

use crate::common::{ids, model, model_dir, temp_dir};

#[test]
fn split_and_reload_gives_the_same_logits() {
    let name = "qwen3_sharded";
    let out = temp_dir("split");
    let blocks = split(&model_dir(name), &out).expect("split");
    let names: Vec<&str> = blocks.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["embed", "head", "layer.0", "layer.1", "layer.2"]);
    for b in &blocks {
        let bytes = std::fs::read(out.join(&b.file)).expect("block file");
        assert_eq!(sha3_hex(&bytes), b.sha3_256);
        assert_eq!(cid_v1_raw(&bytes), b.cid);
        assert!(b.cid.starts_with("bafkrei"), "{}", b.cid);
        assert_eq!(b.file, format!("{}.safetensors", b.sha3_256));
    }
    let input = ids(&model(name)["input_ids"]);
    let a = LoadedModel::load(Some(&model_dir(name)), Device::Cpu, Kind::Float).expect("load");
    let b = LoadedModel::load(Some(&out), Device::Cpu, Kind::Float).expect("load blocks");
    let la = a.model.logits(&input).expect("logits");
    let lb = b.model.logits(&input).expect("logits");
    assert!(la.equal(&lb), "block-loaded model differs");
    // Splitting again gives the same addresses.
    let again = split(&model_dir(name), &temp_dir("split2")).expect("split");
    assert_eq!(blocks, again);
}

#[test]
fn block_with_wrong_hash_is_rejected() {
    let out = temp_dir("tamper");
    let blocks = split(&model_dir("qwen3_single"), &out).expect("split");
    let layer = blocks
        .iter()
        .find(|b| b.name == "layer.1")
        .expect("layer.1");
    let path = out.join(&layer.file);
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let mut store = BlockStore::open(&out).expect("manifest");
    store.load_block("layer.0").expect("untouched block loads");
    let err = store.load_block("layer.1").expect_err("must fail");
    assert!(
        matches!(err, GpuError::HashMismatch { ref name, .. } if name == "layer.1"),
        "{err}"
    );
    let err = LoadedModel::load(Some(&out), Device::Cpu, Kind::Float)
        .err()
        .expect("must fail");
    assert!(matches!(err, GpuError::HashMismatch { .. }), "{err}");
}

#[test]
fn block_tensors_are_views_of_the_mapping() {
    let out = temp_dir("views");
    split(&model_dir("qwen3_single"), &out).expect("split");
    let mut store = BlockStore::open(&out).expect("manifest");
    store.load_block("layer.0").expect("load");
    let sizes = store
        .with_block_tensors("layer.0", |name, t| {
            Ok((name.to_owned(), t.size(), t.kind()))
        })
        .expect("views");
    assert_eq!(sizes.len(), 11);
    assert!(sizes.iter().all(|(_, _, k)| *k == Kind::Float));
    let q = sizes
        .iter()
        .find(|(n, _, _)| n.ends_with("q_proj.weight"))
        .expect("q");
    assert_eq!(q.1, vec![64, 64]);
}

/// KERN-3: a tensor taken out of `with_block_tensors` is a copy, never the
/// view of the mapping: two takes are distinct memory, and both still hold
/// the checkpoint's values after the store (and its mapping) is dropped.
/// (Before, `to_device(Device::Cpu)` handed back the view itself.)
#[test]
fn tensors_taken_from_a_block_are_copies_that_outlive_the_store() {
    let dir = model_dir("qwen3_single");
    let out = temp_dir("escape");
    split(&dir, &out).expect("split");
    let mut store = BlockStore::open(&out).expect("manifest");
    store.load_block("layer.0").expect("load");
    let take = |store: &BlockStore| {
        store
            .with_block_tensors("layer.0", |name, t| {
                Ok((name.to_owned(), t.to_device(Device::Cpu)))
            })
            .expect("tensors")
    };
    let first = take(&store);
    let second = take(&store);
    let copies = store
        .with_block_tensors("layer.0", |_, t| Ok(t.copy()))
        .expect("copies");
    assert_eq!(first.len(), 11);
    for ((a, b), c) in first.iter().zip(&second).zip(&copies) {
        assert_ne!(
            a.1.data_ptr(),
            b.1.data_ptr(),
            "{}: a view of the mapping escaped",
            a.0
        );
        assert_ne!(a.1.data_ptr(), c.data_ptr(), "{}", a.0);
    }
    drop(store);
    use blyan_gpu::weights::TensorSource as _;
    let src = blyan_gpu::weights::SafetensorsDir::open(&dir).expect("checkpoint");
    for (name, t) in &first {
        let want = src.tensor(name).expect("tensor");
        assert!(t.equal(&want), "{name} changed after the store was dropped");
    }
}

#[test]
fn moe_checkpoints_split_per_expert_and_router() {
    let name = "qwen3_moe";
    let out = temp_dir("split-moe");
    let blocks = split(&model_dir(name), &out).expect("split");
    let names: Vec<&str> = blocks.iter().map(|b| b.name.as_str()).collect();
    assert!(names.contains(&"layer.0.router") && names.contains(&"layer.2.router"));
    assert!(
        !names.contains(&"layer.1.router"),
        "layer 1 is dense (mlp_only_layers)"
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("layer.0.expert."))
            .count(),
        8
    );
    let expert = blocks
        .iter()
        .find(|b| b.name == "layer.2.expert.5")
        .expect("expert block");
    assert_eq!(expert.tensors.len(), 3);
    let input = ids(&model(name)["input_ids"]);
    let a = LoadedModel::load(Some(&model_dir(name)), Device::Cpu, Kind::Float).expect("load");
    let b = LoadedModel::load(Some(&out), Device::Cpu, Kind::Float).expect("load blocks");
    assert!(
        a.model
            .logits(&input)
            .expect("a")
            .equal(&b.model.logits(&input).expect("b"))
    );
    // GPT-OSS keeps its stacked expert tensors in one block per layer.
    let out = temp_dir("split-gpt-oss");
    let blocks = split(&model_dir("gpt_oss_mxfp4"), &out).expect("split");
    assert!(blocks.iter().any(|b| b.name == "layer.0.experts"));
    assert!(blocks.iter().any(|b| b.name == "layer.0.router"));
}
