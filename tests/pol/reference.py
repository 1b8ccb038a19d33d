"""Independent reference for tests/pol.rs (spec/pol.md POL-DELTA-6).

Decodes a delta payload (POL-DELTA-2..4) with its own parser, applies it
densely to a Hugging Face checkpoint with numpy in float32 (one rounding for
scale x q, one for the addition, as POL-DELTA-6 says), and runs greedy
generation with transformers on the head and on head + delta. Shares no code
with the node.

usage: reference.py HF_DIR PAYLOAD PROMPT MAX_TOKENS [ACCEPTED_PAYLOAD ...]
(the accepted payloads, oldest first, make the head; PAYLOAD is the delta)
prints one JSON object: {"head_text", "delta_text", "min_margin",
"head_logprobs", "delta_logprobs"}; each logprobs entry is one generated
token: {"id", "logprob", "top": [[id, logprob] x 5]}, the log-softmax of the
float32 logits computed in float64.
"""
import json
import struct
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM


def varint(buf, at):
    value, shift = 0, 0
    while True:
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, at


def decode(buf):
    assert buf[:4] == b"BLYD" and buf[4] == 1 and buf[5] == 0, "not a layout-0 BLYD payload"
    (count,) = struct.unpack_from("<H", buf, 6)
    at = 8
    tensors = []
    for _ in range(count):
        n = buf[at]
        name = buf[at + 1 : at + 1 + n].decode()
        at += 1 + n
        dtype, rank = buf[at], buf[at + 1]
        rows, cols, k = struct.unpack_from("<III", buf, at + 2)
        at += 14
        assert dtype == 0, "the reference handles f32 bases only"
        entries = []
        for r in range(rows):
            (scale,) = struct.unpack_from("<f", buf, at)
            at += 4
            cs, c = [], -1
            for j in range(k):
                gap, at = varint(buf, at)
                c = gap if j == 0 else c + gap + 1
                cs.append(c)
            qs = struct.unpack_from(f"<{k}b", buf, at)
            at += k
            entries.append((r, np.float32(scale), cs, qs))
        tensors.append((name, rank, rows, cols, entries))
    assert at == len(buf), "trailing bytes"
    return tensors


def apply(weights, payload):
    for name, rank, rows, cols, entries in decode(payload):
        w = weights[name].astype(np.float32).reshape(rows, cols).copy()
        for r, scale, cs, qs in entries:
            for c, q in zip(cs, qs):
                d = np.float32(scale * np.float32(q))
                w[r, c] = np.float32(w[r, c] + d)
        weights[name] = w.reshape(weights[name].shape)


def greedy(hf_dir, weights, ids, max_tokens, eos):
    config = AutoConfig.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or "lm_head" in m and config.tie_word_embeddings for m in missing), missing
    model.eval()
    out, margin, logprobs = [], float("inf"), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margin = min(margin, float(top[0] - top[1]))
            nxt = int(torch.argmax(logits))
            if nxt in eos:
                break
            out.append(nxt)
            # log-softmax of the f32 logits, computed in float64
            lp = torch.log_softmax(logits.double(), -1)
            best = torch.topk(lp, 5)
            logprobs.append({
                "id": nxt,
                "logprob": float(lp[nxt]),
                "top": [[int(i), float(v)] for v, i in zip(best.values, best.indices)],
            })
    return out, margin, logprobs


def main():
    hf_dir, payload_path, prompt, max_tokens = sys.argv[1:5]
    accepted = sys.argv[5:]
    weights = load_file(f"{hf_dir}/model.safetensors")
    for p in accepted:
        apply(weights, open(p, "rb").read())
    tok = Tokenizer.from_file(f"{hf_dir}/tokenizer.json")
    eos = set(json.load(open(f"{hf_dir}/config.json")).get("eos_token_id", []) or [])
    if isinstance(eos, int):
        eos = {eos}
    ids = tok.encode(prompt, add_special_tokens=False).ids
    head_ids, head_margin, head_lp = greedy(hf_dir, dict(weights), ids, int(max_tokens), eos)
    apply(weights, open(payload_path, "rb").read())
    delta_ids, delta_margin, delta_lp = greedy(hf_dir, weights, ids, int(max_tokens), eos)
    print(json.dumps({
        "head_text": tok.decode(head_ids, skip_special_tokens=True),
        "delta_text": tok.decode(delta_ids, skip_special_tokens=True),
        "min_margin": min(head_margin, delta_margin),
        "head_logprobs": head_lp,
        "delta_logprobs": delta_lp,
    }))


main()
