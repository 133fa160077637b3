#!/usr/bin/env bash
# The README's GPU measurements ("On a GPU"), on one GPU, in one call:
#
#   bash experiments/gpu_benchmarks.sh NANOGPT_DIR [tests] [step] [peers] [generation]
#
# tests       the Triton and cuDNN attention kernels compiled for the GPU against the reference
# step        train.benchmark, GPT-2 124M, bfloat16, 32 x 1024, with each GPU attention kernel
# peers       experiments.peers against nanoGPT (its model.py in NANOGPT_DIR), eager and compiled
# generation  experiments.generation_peers against Hugging Face `generate`, bfloat16
#
# With no section named, all four run in that order. With PROFILE_DIR set, `step` also writes
# a trace of each kernel's steps under PROFILE_DIR/KERNEL (train.benchmark --profile_dir).
# `peers` needs torch, and `generation` torch and transformers for its comparison (without
# them it times this side alone). PYTHON
# names the interpreter (default python3), which needs jax with CUDA, flax, optax, absl, etils
# and ml-collections (what these four sections import), not the whole project install.
set -euo pipefail
cd "$(dirname "$0")/.."
nanogpt=${1:?usage: $0 NANOGPT_DIR [tests] [step] [peers] [generation]}
shift
sections=${*:-tests step peers generation}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
for section in $sections; do
  case $section in
    tests | step | peers | generation) ;;
    *) echo "unknown section '$section': expected tests, step, peers or generation" >&2; exit 2 ;;
  esac
done

for section in $sections; do
  echo "== $section"
  case $section in
    tests)
      JAX_PLATFORMS=cuda,cpu "$python" -m pytest tests/model/test_attention.py -k compiled -q ;;
    step)
      for attention in pallas_gpu cudnn_gpu xla; do
        "$python" -m train.benchmark --preset=gpt2-124m --batch_size=32 --seq_len=1024 \
          --dtype=bfloat16 --attention=$attention ${PROFILE_DIR:+--profile_dir="$PROFILE_DIR/$attention"}
      done ;;
    peers)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 "$python" -m experiments.peers --nanogpt="$nanogpt" \
        --torch_compile --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 \
        --batch_size=32 --seq_len=1024 --dtype=bfloat16 --steps=20 ;;
    generation)
      peer=--peer
      "$python" -c "import torch, transformers" 2>/dev/null || peer=--nopeer
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 "$python" -m experiments.generation_peers \
        --dtype=bfloat16 --batch_sizes=1,32,128 --repeats=2 $peer ;;
  esac
done
