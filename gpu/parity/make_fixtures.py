#!/usr/bin/env python3
"""Tiny random checkpoints made with transformers, and transformers' outputs.

Writes, under OUT (default: target/blyan-parity at the repo root):
  qwen3_single/   Qwen3, config.json as transformers 5.x writes it
                  (rope_parameters), one model.safetensors, untied head.
  qwen3_sharded/  Qwen3 with tied embeddings and attention biases, config.json
                  rewritten in transformers 4.x form (rope_theta, rope_scaling,
                  torch_dtype), sharded safetensors with model.safetensors.index.json.
  qwen3_moe/      Qwen3-MoE (8 experts, top-2, renormalised; layer 1 dense).
  gpt_oss_plain/  GPT-OSS (sinks, alternating sliding window 4, YaRN, biases,
                  clamped SwiGLU), experts as plain tensors, 5.x config.
  gpt_oss_mxfp4/  the same weights, experts as MXFP4 _blocks/_scales, 4.x
                  config (rope_scaling) as the published GPT-OSS ships.
  manifest.json   for each model: input ids, transformers' f32 and bf16
                  logits for them, and a greedy generation (f32).
The Rust tests (gpu/tests/it/parity.rs) compare blyan-gpu against these.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (GptOssConfig, GptOssForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

INPUT_IDS = [1, 5, 9, 42, 7, 100, 3, 250, 17, 299]
PROMPT = [3, 14, 15, 92, 65]
NEW_TOKENS = 24


def randomise(model, seed):
    """O(1) logits with clear maxima (transformers' std 0.02 init gives
    near-ties that make greedy comparisons meaningless)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def make(out, name, seed, tie, bias, shard, v4_config, moe=False):
    config_cls, model_cls = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if moe else (Qwen3Config, Qwen3ForCausalLM)
    extra = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[1]) if moe else {}
    cfg = config_cls(
        **extra,
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        attention_bias=bias,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    # rope_theta: the 4.x and 5.x constructors spell it differently.
    try:
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
    except Exception:
        pass
    cfg.rope_theta = 1000000.0
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    randomise(model, seed)
    path = os.path.join(out, name)
    model.save_pretrained(path, max_shard_size="100KB" if shard else "10GB", safe_serialization=True)
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    if not v4_config:
        # Pure 5.x form: the theta lives only in rope_parameters.
        assert "rope_parameters" in c, "transformers did not write rope_parameters"
        c.pop("rope_theta", None)
    else:
        rp = c.pop("rope_parameters", None) or {}
        c["rope_theta"] = rp.get("rope_theta", 1000000.0)
        c["rope_scaling"] = None
        c["torch_dtype"] = c.pop("dtype", "float32")
        c["transformers_version"] = "4.51.0"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    ids = torch.tensor([INPUT_IDS])
    with torch.no_grad():
        logits_f32 = model(ids).logits[0].float()
        bf16 = model_cls.from_pretrained(path, dtype=torch.bfloat16).eval()
        logits_bf16 = bf16(ids).logits[0].float()
        # Greedy, one forward per token over the whole prefix (no cache): the
        # plainest statement of greedy decoding.
        seq = list(PROMPT)
        for _ in range(NEW_TOKENS):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
        gen = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)[0].tolist()
    assert gen == seq, f"transformers generate {gen} disagrees with the greedy loop {seq}"
    return {
        "dir": name,
        "input_ids": INPUT_IDS,
        "logits_f32": logits_f32.tolist(),
        "logits_bf16": logits_bf16.tolist(),
        "prompt": PROMPT,
        "greedy": seq[len(PROMPT):],
    }


FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4(w):
    """Quantises an expert tensor in transformers' parameter layout
    [experts, in, out] (y = x @ w) to MXFP4 as GPT-OSS checkpoints store it:
    blocks [experts, out, in/32, 16] (two FP4 codes per byte, low nibble
    first) and scales [experts, out, in/32] (power-of-two exponent + 127).
    Returns (blocks, scales, dequantised w in the parameter layout)."""
    lut = torch.tensor(FP4_VALUES)
    wt = w.detach().float().transpose(1, 2).contiguous()  # [E, out, in]
    e, r, c = wt.shape
    g = wt.reshape(e, r, c // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0 ** -100)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.pow(2.0, exp)[..., None]
    idx = (scaled.abs()[..., None] - lut[:8]).abs().argmin(-1) + 8 * (scaled < 0).long()
    deq = lut[idx] * torch.pow(2.0, exp)[..., None]
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    scales = (exp + 127).to(torch.uint8)
    return blocks, scales, deq.reshape(e, r, c).transpose(1, 2).contiguous()


def make_gpt_oss(out, seed):
    """GPT-OSS: a plain checkpoint, and the same weights with the experts in
    MXFP4 (transformers cannot write MXFP4 without GPU kernels, so we do).
    The experts are quantised first and transformers runs on the dequantised
    values, so both checkpoints must give transformers' logits."""
    cfg = GptOssConfig(
        vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4, rms_norm_eps=1e-5, max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096,
                         "rope_theta": 150000.0},
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GptOssForCausalLM(cfg).eval()
    randomise(model, seed)
    quant = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape))
            for name in ["gate_up_proj", "down_proj"]:
                p = getattr(layer.mlp.experts, name)
                blocks, scales, deq = mxfp4(p)
                p.copy_(deq)
                quant[f"model.layers.{i}.mlp.experts.{name}"] = (blocks, scales)
    plain = os.path.join(out, "gpt_oss_plain")
    model.save_pretrained(plain, safe_serialization=True)
    packed = os.path.join(out, "gpt_oss_mxfp4")
    os.makedirs(packed, exist_ok=True)
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    for name, (blocks, scales) in quant.items():
        del tensors[name]
        tensors[name + "_blocks"] = blocks
        tensors[name + "_scales"] = scales
    save_file(tensors, os.path.join(packed, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(plain, "config.json")) as f:
        c = json.load(f)
    # The real GPT-OSS config.json is in transformers 4.x form.
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    c["rope_scaling"] = rp
    c["experts_per_token"] = c["num_experts_per_tok"]
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(packed, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    ids = torch.tensor([INPUT_IDS])
    with torch.no_grad():
        logits_f32 = model(ids).logits[0].float()
        seq = list(PROMPT)
        for _ in range(NEW_TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        bf16 = GptOssForCausalLM.from_pretrained(plain, dtype=torch.bfloat16, attn_implementation="eager").eval()
        logits_bf16 = bf16(ids).logits[0].float()
    entry = {"input_ids": INPUT_IDS, "logits_f32": logits_f32.tolist(), "logits_bf16": logits_bf16.tolist(),
             "prompt": PROMPT, "greedy": seq[len(PROMPT):]}
    return [dict(entry, dir="gpt_oss_plain"), dict(entry, dir="gpt_oss_mxfp4")]


QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_TEXTS = ["Hello, world! It's 2026.", "  spaces\tand\nnew lines\n\n", "héllo ☃ 東京 don't", ""]


def make_tokenizer(out, dirs):
    """A byte-level BPE with Qwen2/Qwen3's pre-tokenizer regex (the same
    pipeline as Qwen3's tokenizer.json), trained on a few lines, written
    into `dirs`; returns the texts and transformers-side (tokenizers) ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    corpus = ["Hello world, hello tokenizer. It's a test of the byte-level BPE."] * 20 + TOKENIZER_TEXTS
    tok.train_from_iterator(corpus, trainer)
    for d in dirs:
        tok.save(os.path.join(out, d, "tokenizer.json"))
    return {"texts": TOKENIZER_TEXTS, "ids": [tok.encode(t).ids for t in TOKENIZER_TEXTS]}


def main():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(root, "target", "blyan-parity"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    models = [
        make(args.out, "qwen3_single", 1, tie=False, bias=False, shard=False, v4_config=False),
        make(args.out, "qwen3_sharded", 2, tie=True, bias=True, shard=True, v4_config=True),
        make(args.out, "qwen3_moe", 3, tie=False, bias=False, shard=False, v4_config=False, moe=True),
    ] + make_gpt_oss(args.out, 4)
    tokenizer = make_tokenizer(args.out, ["qwen3_single"])
    manifest = {"torch": torch.__version__, "transformers": transformers.__version__, "models": models,
                "tokenizer": tokenizer}
    tmp = os.path.join(args.out, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, os.path.join(args.out, "manifest.json"))
    print(f"wrote {len(models)} models to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
