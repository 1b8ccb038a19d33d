#!/usr/bin/env bash
# Builds the release binary here and copies it with the bench scripts into
# DEST (default: .gpu-bundle at the repo root), for a device machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.gpu-bundle}
. .venv/bin/activate
# The dev profile (dependencies at opt-level 2) is what BENCH.md measured:
# the hot path is libtorch and the CUDA graph, and a release build would
# recompile torch-sys's C++ wrapper for minutes.
LIBTORCH_USE_PYTORCH=1 cargo build -p blyan-gpu --bin blyan-gpu
mkdir -p "$DEST"
cp target/debug/blyan-gpu "$DEST/"
strip "$DEST/blyan-gpu"
cp gpu/bench/hf_bench.py gpu/bench/device_run.sh "$DEST/"
du -sh "$DEST"
