#!/usr/bin/env bash
# The project's main job, set up from scratch: create/refresh .venv (scripts/setup_env.sh), then
# pretrain the tiny DeepSeek-V3-style MoE model (examples/pretrain_deepseek_v3, --config tiny) on
# megatron-core with the DeepEP dispatcher: 4 ranks over gloo, expert parallelism 4, 60 steps
# (about a minute on 2 CPU cores; on a GPU machine the ranks share GPU 0 under MPS).
# Every step prints loss, throughput, and dispatch/combine bandwidth, time and expert imbalance.
# Results: a wandb offline run under runs/wandb/ and per-step scalars in runs/tiny_metrics.jsonl.
# Extra arguments go to pretrain.py (Megatron-LM flags, e.g. --train-iters 100).
# The previous main job, the dispatch/combine benchmark: python -m deepep_megatron.bench --help.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
VENV=${DEEPEP_MEGATRON_VENV:-.venv}
mkdir -p runs
export WANDB_MODE=${WANDB_MODE:-offline}
exec "$VENV/bin/python" -m deepep_megatron.launch --nproc 4 examples/pretrain_deepseek_v3/pretrain.py \
  --config tiny --wandb-save-dir runs --metrics-jsonl runs/tiny_metrics.jsonl "$@"
