#!/usr/bin/env bash
# The whole GPU check, in one call on a lent H100/H200 (run from the repo
# root with the bundle in .gpu-bundle/, see gpu/bench/make_bundle.sh):
# environment, correctness of the CUDA path against the CPU and of the
# graph-replayed engine against the reference, our bench, transformers'
# bench and the copy bandwidth. Results under $OUT (or ./bench-out).
set -uo pipefail
export PYTHONUNBUFFERED=1
B=${B:-.gpu-bundle}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
TORCH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
SITE=$(dirname "$TORCH")
export LD_LIBRARY_PATH="$TORCH/lib:$SITE/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
T0=$SECONDS
stamp() { echo "== $1 (t=$((SECONDS - T0)) s)"; }
{
stamp env
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
ldd "$B/blyan-gpu" | grep -E 'not found|libtorch_cuda|cudart' || true
stamp "logits cpu vs cuda (default model, f32)"
"$B/blyan-gpu" logits --input-ids 72,101,108,108,111,44,32,66 > "$OUT/logits_cpu.json"
"$B/blyan-gpu" logits --input-ids 72,101,108,108,111,44,32,66 --device cuda > "$OUT/logits_cuda.json"
python3 - "$OUT" <<'PY'
import json, sys
a = json.load(open(sys.argv[1] + "/logits_cpu.json"))["logits"]
b = json.load(open(sys.argv[1] + "/logits_cuda.json"))["logits"]
d = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
print(json.dumps({"check": "logits cpu vs cuda f32", "rows": len(b), "max_abs_diff": d, "ok": d <= 1e-4}))
PY
stamp "engine (graph) vs reference, continuous batching on the graph"
"$B/blyan-gpu" check --device cuda --dtype f32
"$B/blyan-gpu" check --device cuda --dtype bf16
"$B/blyan-gpu" check --device cuda --dtype bf16 --no-fused
stamp "generate on cuda"
"$B/blyan-gpu" generate --prompt "Hello" --max-tokens 16 --device cuda --dtype bf16 --temperature 0.7 --seed 1 | od -c | head -3
Q="$B/blyan-gpu bench --qwen3-8b --device cuda"
stamp "our bench: Qwen3-8B-shaped bf16"
$Q --prompt-len 2048 --decode-tokens 128 --batch 1,16 | tee "$OUT/ours.jsonl"
stamp "variants (prefill 128 only)"
{
$Q --prompt-len 128 --decode-tokens 128 --batch 1,16 --no-fused
$Q --decode-tokens 128 --batch 1 --matmuls-only
$Q --prompt-len 128 --decode-tokens 32 --batch 1 --no-graph
"$B/blyan-gpu" bench --device cuda --block-mb 52
"$B/blyan-gpu" bench --device cuda --block-mb 52
} | tee "$OUT/variants.jsonl"
stamp "transformers bench + copy bandwidth"
timeout 240 python3 "$B/hf_bench.py" 32 | tee "$OUT/hf.jsonl"
stamp "tiny model on cpu"
"$B/blyan-gpu" bench --device cpu --batch 1,16,1 | tee "$OUT/tiny_cpu.jsonl"
"$B/blyan-gpu" bench --device cpu --block-mb 52 | tee -a "$OUT/tiny_cpu.jsonl"
stamp done
} 2>&1 | tee "$OUT/log.txt"
