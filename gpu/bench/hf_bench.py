#!/usr/bin/env python3
"""transformers' side of the GPU benchmark, and the copy bandwidth.

Qwen3-8B-shaped random bf16 weights, eager and sdpa attention: decode
tokens/s at batch 1 and 16 (prompt 32, KV cache, greedy), prefill tokens/s
at 2048 (logits for the last position only, as ours). Prints JSON lines.
"""
import json
import sys
import time

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM


def report(**kw):
    print(json.dumps(kw), flush=True)


def copy_bandwidth():
    n = 4 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3 / reps
    report(what="copy", tb_s=round(2 * n / s / 1e12, 3), bytes=n)
    del x, y


def main():
    decode_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    report(what="env", torch=torch.__version__, transformers=transformers.__version__,
           gpu=torch.cuda.get_device_name())
    copy_bandwidth()
    cfg = Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    report(what="hf_init", s=round(time.perf_counter() - t, 1))
    for impl in ["eager", "sdpa"]:
        try:
            model.set_attn_implementation(impl)
        except Exception as e:  # older API
            model.config._attn_implementation = impl
        with torch.no_grad():
            ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
            model(ids, logits_to_keep=1)
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            s = sorted(times)[1]
            report(what="prefill", impl=impl, batch=1, tokens_per_s=round(2048 / s, 1), ms=round(s * 1e3, 2))
            for b in [1, 16]:
                ids = torch.randint(0, cfg.vocab_size, (b, 32), device="cuda")
                out = model(ids, use_cache=True, logits_to_keep=1)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(3):
                    out = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(decode_steps):
                    out = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                s = (time.perf_counter() - t) / decode_steps
                report(what="decode", impl=impl, batch=b, tokens_per_s=round(b / s, 1), ms_per_step=round(s * 1e3, 2))
                del past, out


if __name__ == "__main__":
    main()
