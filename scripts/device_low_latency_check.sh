#!/usr/bin/env bash
# GPU checks of the low-latency kernels (NVSHMEM), for a machine with an NVIDIA GPU, run from the
# repo root:
#
#   scripts/device_low_latency_check.sh [probe|tests|bench|all] [pytest -k expression]
#
# Builds deepep_megatron._nvshmem unless it imports, runs a 2-rank
# probe (a bootstrap problem shows up in seconds), the GPU tests, and the benchmark at R = 8 and
# R = 2 with 16 SMs per rank. Every step has a time limit, so nothing hangs past it. Logs and
# results go to $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
what=${1:-all}
tests_filter=${2:-}
status=0

# The low-latency family needs only `_nvshmem`; DEEPEP_MEGATRON_EXTENSIONS=_C,_nvshmem builds both.
export DEEPEP_MEGATRON_EXTENSIONS=${DEEPEP_MEGATRON_EXTENSIONS:-_nvshmem}
if ! python3 -c "import torch, deepep_megatron._nvshmem" 2>"$OUT/import.log"; then
  echo "building $DEEPEP_MEGATRON_EXTENSIONS here"
  start=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} timeout 400 python3 setup.py build_ext --inplace -j "$(nproc)" \
    >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "built in $((SECONDS - start)) s"
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ $what == probe || $what == all ]]; then
  timeout 100 python3 scripts/ll_probe.py 2 1 2>&1 | tee "$OUT/probe.log" | tail -8 || { echo "probe failed"; exit 1; }
fi
if [[ $what == tests || $what == all ]]; then
  # -s: the rank processes' own output (NVSHMEM, CUDA) lands in the log too.
  timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest tests/test_gpu_low_latency.py -q -s -x -m gpu -p no:cacheprovider \
    --timeout 400 ${tests_filter:+-k "$tests_filter"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || status=1
fi
if [[ $what == bench || $what == all ]]; then
  for ranks in ${BENCH_RANKS:-8 2}; do
    timeout "${BENCH_TIMEOUT:-180}" python3 -m deepep_megatron.bench --low-latency --nproc "$ranks" --num-sms 16 \
      --routing random --backend cuda --timeout 150 --json "$OUT/ll_bench_r$ranks.json" 2>&1 |
      tee "$OUT/ll_bench_r$ranks.log" | tail -16 || status=1
  done
fi
exit $status
