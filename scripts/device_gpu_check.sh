#!/usr/bin/env bash
# GPU checks of the intranode kernels, for a machine with an NVIDIA GPU, run from the repo root.
#
#   scripts/device_gpu_check.sh [tests|soak|bench|all] [extra bench args...]
#
# The extension must match the machine's torch: a prebuilt one in .device-ext/ (built elsewhere
# against the same torch version) is used if present, otherwise it is built here. Logs and
# results go to $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
what=${1:-all}
shift || true

if ls .device-ext/deepep_megatron/_C*.so >/dev/null 2>&1; then
  cp .device-ext/deepep_megatron/_C*.so deepep_megatron/
fi
if ! python3 -c "import deepep_megatron._C" 2>"$OUT/import.log"; then
  echo "building the extension here"
  TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace -j "$(nproc)" >"$OUT/build.log" 2>&1 || {
    tail -40 "$OUT/build.log"
    exit 1
  }
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
status=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest tests/test_gpu_intranode.py -q -x -m "gpu and not slow" -p no:cacheprovider --timeout 900 \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -30 || status=1
fi
if [[ $what == soak || $what == all ]]; then
  python3 -m pytest tests/test_gpu_intranode.py -q -x -m "gpu and slow" -p no:cacheprovider --timeout 900 \
    2>&1 | tee "$OUT/gpu_soak.log" | tail -15 || status=1
fi
if [[ $what == bench || $what == all ]]; then
  for spec in "2:8 16 24" "4:8 16 24" "8:8 16"; do
    ranks=${spec%%:*}
    # shellcheck disable=SC2086
    python3 -m deepep_megatron.bench --nproc "$ranks" --num-sms ${spec#*:} --json "$OUT/bench_r$ranks.json" "$@" \
      2>&1 | tee "$OUT/bench_r$ranks.log" | tail -25 || status=1
  done
fi
exit $status
