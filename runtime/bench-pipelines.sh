#!/bin/bash
# Issue 12: bench-chat for routes of 0 (local), 1, 2 and 4 stages at 1 and 16
# clients, then one hop at hidden 4,096 bf16 (runtime/BENCH.md). ~12 minutes.
# Needs: cargo build --release -p blyan-runtime --bin blyan --example pipeline_hop
cd "$(dirname "$0")/.."
B=target/release/blyan
for c in 1 16; do
  for cfg in "0 0" "2 0" "4 0" "8 4"; do
    set -- $cfg
    echo "=== clients $c inference_nodes $1 stages $2"
    $B bench-chat --clients $c --duration 15 --max-tokens 32 --inference-nodes $1 --stages $2 --max-stage-batch ${3:-16} 2>&1 | grep -v "^\s*$" | grep -v INFO | tail -8
  done
done
echo "=== pipeline_hop"
target/release/examples/pipeline_hop 150 12288 2>&1 | tail -4
echo BENCH DONE
