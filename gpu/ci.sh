#!/usr/bin/env bash
# CI for blyan-gpu, called by .ci/run from the repo root.
#  1. a project-local venv .venv with PyPI torch 2.11.0 (CUDA 13 wheel, ~4.6 GB),
#     transformers, safetensors, numpy;
#  2. the parity fixtures (tiny random checkpoints and transformers' outputs);
#  3. cargo test -p blyan-gpu with LIBTORCH_USE_PYTORCH=1.
# `gpu/ci.sh --venv` does 1 only (for `runtime/devnet`).
# `gpu/ci.sh --setup` does 1 and 2 only (for a caller that then runs the
# workspace's cargo commands itself with the venv active and
# LIBTORCH_USE_PYTORCH=1, BLYAN_PARITY_DIR=$PWD/target/blyan-parity).
# Any cargo command that builds blyan-gpu needs the venv active and
# LIBTORCH_USE_PYTORCH=1 (changing either rebuilds torch-sys).
set -euo pipefail
cd "$(dirname "$0")/.."
stage_start=$SECONDS
stage() {
    local now=$SECONDS
    echo "gpu/ci.sh: $1 took $((now - stage_start)) s" >&2
    stage_start=$now
}

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# Pinned: the parity fixtures are transformers' outputs, so its version matters.
PY_PINS="torch==2.11.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6"
if ! python -c 'import torch, transformers, safetensors, numpy; assert torch.__version__.startswith("2.11.0"); assert transformers.__version__ == "5.24.0"' 2>/dev/null; then
    python -m pip install --quiet --upgrade pip
    # Not quiet: the torch wheel and its CUDA libraries are ~4.6 GB, minutes
    # of download; pip shows each file and its progress (a bar on a terminal).
    echo "gpu/ci.sh: installing $PY_PINS (torch is ~4.6 GB with its CUDA libraries; first run only)" >&2
    # shellcheck disable=SC2086
    python -m pip install --progress-bar on $PY_PINS
fi
stage "venv (torch $(python -c 'import torch; print(torch.__version__)'))"
if [ "${1:-}" = "--venv" ]; then
    exit 0
fi
# Test-only Python packages (not needed by `runtime/devnet`): the OpenAI SDK
# for the paid-inference end-to-end test, selenium for the explorer's browser
# tests, kubernetes-validate for the deployment manifests, psycopg2 to read
# back the PostgreSQL usage sink.
TEST_PINS="openai==3.63.0 selenium==4.51.0 kubernetes-validate==1.37.0 psycopg2-binary==2.9.13"
if ! python -c 'import openai, selenium, kubernetes_validate, psycopg2' 2>/dev/null; then
    # shellcheck disable=SC2086
    python -m pip install --quiet $TEST_PINS
fi
stage "test packages (openai, selenium, kubernetes-validate, psycopg2)"

export LIBTORCH_USE_PYTORCH=1
export BLYAN_PARITY_DIR="${BLYAN_PARITY_DIR:-$PWD/target/blyan-parity}"
rm -rf "$BLYAN_PARITY_DIR"
python gpu/parity/make_fixtures.py --out "$BLYAN_PARITY_DIR"
stage "parity fixtures"
if [ "${1:-}" = "--setup" ]; then
    exit 0
fi

cargo build -p blyan-gpu --all-targets
stage "cargo build"
cargo test -p blyan-gpu
stage "cargo test"
