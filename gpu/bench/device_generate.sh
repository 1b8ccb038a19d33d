#!/usr/bin/env bash
# Short device check of `generate --device cuda` (decode engine + graph +
# continuous-batching loop) against the CPU reference path: greedy outputs
# of the default model must be byte-identical in f32.
set -uo pipefail
B=${B:-.gpu-bundle}
TORCH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH/lib:$(dirname "$TORCH")/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
for p in "Hello" "The quick brown fox" "x"; do
  a=$("$B/blyan-gpu" generate --prompt "$p" --max-tokens 40 2>/dev/null | od -An -tx1 | tr -d ' \n')
  b=$("$B/blyan-gpu" generate --prompt "$p" --max-tokens 40 --device cuda 2>/dev/null | od -An -tx1 | tr -d ' \n')
  echo "{\"prompt\": \"$p\", \"cpu_reference_vs_cuda_engine_identical\": $([ "$a" = "$b" ] && [ -n "$a" ] && echo true || echo false)}"
done
time "$B/blyan-gpu" generate --prompt "Hello" --max-tokens 200 --device cuda --dtype bf16 --temperature 0.8 --seed 3 > /dev/null
"$B/blyan-gpu" generate --prompt "Hello" --max-tokens 20 --device cuda --dtype bf16 --temperature 0.8 --seed 3 --stop "a" | od -c | head -3
