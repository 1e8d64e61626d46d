#!/usr/bin/env bash
# GPU checks of the internode kernels (NVSHMEM between nodes, forwarding inside a node), for a
# machine with an NVIDIA GPU, run from the repo root:
#
#   scripts/device_internode_check.sh [build|tests|bench|all] [pytest -k expression]
#
# With a 10-minute limit per command, run `build`, then `tests` (or `tests "2x2 or absent"` to
# start small), then `bench`, as separate commands.
# Builds deepep_megatron._nvshmem (and _C, for the intranode comparison) unless they import, runs
# the GPU tests (tests/test_gpu_internode.py: R = 4, 6, 8 split into 2-4 emulated nodes on one GPU
# under MPS) and the benchmark: R = 8 as 2 nodes x 4 and 4 x 2 with 16 SMs per rank, random and
# group-limited routing (network bytes reported), next to the intranode kernels at R = 8 (DESIGN.md
# target: internode >= 60% of intranode). Every step has a time limit. Logs and results go to $OUT
# (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
what=${1:-all}
tests_filter=${2:-}
status=0

export DEEPEP_MEGATRON_EXTENSIONS=${DEEPEP_MEGATRON_EXTENSIONS:-_C,_nvshmem}
if ! python3 -c "import torch, deepep_megatron._C, deepep_megatron._nvshmem as m; m.InternodeRuntime" 2>"$OUT/import.log"; then
  echo "building $DEEPEP_MEGATRON_EXTENSIONS here"
  start=$SECONDS
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} timeout 500 python3 setup.py build_ext --inplace -j "$(nproc)" \
    >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "built in $((SECONDS - start)) s"
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ $what == tests || $what == all ]]; then
  # -s: the rank processes' own output (NVSHMEM, CUDA) lands in the log too.
  timeout "${TESTS_TIMEOUT:-570}" python3 -m pytest tests/test_gpu_internode.py -q -s -x -m gpu -p no:cacheprovider \
    --timeout 520 ${tests_filter:+-k "$tests_filter"} 2>&1 | tee "$OUT/gpu_internode_tests.log" | tail -40 || status=1
fi
if [[ $what == bench || $what == all ]]; then
  for per_node in ${BENCH_RANKS_PER_NODE:-4 2}; do
    timeout "${BENCH_TIMEOUT:-240}" python3 -m deepep_megatron.bench --nproc 8 --num-ranks-per-node "$per_node" \
      --num-sms 16 --backend cuda --timeout 200 --json "$OUT/internode_bench_r8_node$per_node.json" 2>&1 |
      tee "$OUT/internode_bench_r8_node$per_node.log" | tail -16 || status=1
  done
  # The same shapes on the intranode kernels (one node of 8), for the 60% comparison.
  timeout "${BENCH_TIMEOUT:-240}" python3 -m deepep_megatron.bench --nproc 8 --num-sms 16 --backend cuda \
    --timeout 200 --json "$OUT/intranode_bench_r8.json" 2>&1 | tee "$OUT/intranode_bench_r8.log" | tail -16 || status=1
fi
exit $status
