#!/usr/bin/env bash
# GPU checks of the Megatron integration (deepep_megatron.megatron), for a machine with an NVIDIA
# GPU and no package registry, run from the repository root:
#
#   scripts/device_megatron_check.sh [tests|proxy|all]
#   scripts/device_megatron_check.sh table [RUN,RUN,...]   # scripts/megatron_step_table.py
#
# 1. Installs megatron-core, wandb and their missing dependencies from the wheels in .whl/
#    (fetched beforehand with ../shared/device/fetch-wheels.sh) into /tmp/site.
# 2. Uses the compiled extension from .device-ext/ if present, else builds it (as
#    scripts/device_gpu_check.sh does).
# 3. tests: the GPU sections of tests/test_megatron_dispatcher.py and test_megatron_pretrain.py
#    (4 ranks on one GPU under MPS: DeepEP dispatcher vs reference, EP=1/2/4 equivalence,
#    compiled vs portable through a whole MoELayer, FP8 dispatch; proxy losses compiled vs
#    portable backend; megatron's flex dispatcher on our Buffer; the EP-overlap schedule vs plain
#    steps, and the example on megatron-core's schedules with and without the overlap; grouped-GEMM
#    experts vs SequentialMLP; the deepep dispatcher's expert TP / capacity / padding options).
# 4. proxy: short DeepSeek-V3 proxy runs (14 layers, 64 experts top-8, MLA), EP=4 ranks on one GPU:
#    deepep with FP8 dispatch, deepep with BF16 dispatch; and EP=1 (one process, NCCL) deepep vs
#    megatron-core's alltoall dispatcher (same losses expected; step time compared).
#
# Everything is written to $OUT (default ./gpu_out): logs, per-iteration metrics (*.jsonl), a
# summary, and the wandb offline runs.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline}
what=${1:-all}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 ||
    { tail -20 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import megatron.core, megatron.training, wandb; print('megatron-core', megatron.core.__version__)" \
  2>&1 | tail -3 | tee "$OUT/imports.log"

if ls .device-ext/deepep_megatron/_C*.so >/dev/null 2>&1; then
  cp .device-ext/deepep_megatron/_C*.so deepep_megatron/
fi
if ! python3 -c "import deepep_megatron._C" 2>"$OUT/ext_import.log"; then
  echo "building the extension here"
  TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace -j "$(nproc)" >"$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; echo "extension build failed: the Buffer will use the portable backend"; }
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
status=0

if [[ $what == tests || $what == all ]]; then
  python3 -m pytest tests/test_megatron_dispatcher.py tests/test_megatron_pretrain.py \
    tests/test_megatron_flex.py tests/test_megatron_overlap.py tests/test_megatron_grouped_experts.py \
    tests/test_megatron_dispatcher_options.py -m gpu -q -rs -s \
    -p no:cacheprovider --timeout 1200 2>&1 | tee "$OUT/megatron_gpu_tests.log" | tail -30 || status=1
fi

proxy() { # name nproc args...
  local name=$1 nproc=$2
  shift 2
  python3 -m deepep_megatron.launch --nproc "$nproc" examples/pretrain_deepseek_v3/pretrain.py --config proxy \
    --train-iters "${PROXY_ITERS:-30}" --wandb-save-dir "$OUT/wandb" --wandb-exp-name "proxy-$name" \
    --metrics-jsonl "$OUT/proxy_$name.jsonl" "$@" 2>&1 | tee "$OUT/proxy_$name.log" | grep -E "^\[pretrain\]|^iter" | tail -8
  return "${PIPESTATUS[0]}"
}

if [[ $what == proxy || $what == all ]]; then
  proxy ep4_fp8 4 --expert-model-parallel-size 4 --distributed-backend gloo || status=1
  proxy ep4_bf16 4 --expert-model-parallel-size 4 --distributed-backend gloo --no-deepep-fp8-dispatch || status=1
  proxy ep1_deepep 1 --expert-model-parallel-size 1 || status=1
  proxy ep1_alltoall 1 --expert-model-parallel-size 1 --moe-token-dispatcher-type alltoall || status=1
  python3 - "$OUT" <<'EOF' | tee "$OUT/proxy_summary.txt"
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
runs = {}
for path in sorted(out.glob("proxy_*.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if rows:
        runs[path.stem[len("proxy_"):]] = rows
for name, rows in runs.items():
    steady = rows[2:] or rows
    def mean(key):
        values = [r[key] for r in steady if key in r]
        return statistics.mean(values) if values else float("nan")
    print(f"{name:14s} loss {rows[0]['train/loss']:.4f} -> {rows[-1]['train/loss']:.4f} | "
          f"{mean('train/iteration_time_s'):.3f} s/it | dispatch {mean('deepep/dispatch_GBps'):.1f} GB/s "
          f"({mean('deepep/dispatch_ms'):.2f} ms) | combine {mean('deepep/combine_GBps'):.1f} GB/s "
          f"({mean('deepep/combine_ms'):.2f} ms) | imbalance {mean('deepep/expert_imbalance'):.2f}")
def compare(a, b):
    if a in runs and b in runs:
        diffs = [abs(x["train/loss"] - y["train/loss"]) for x, y in zip(runs[a], runs[b])]
        print(f"max |loss({a}) - loss({b})| over {len(diffs)} iterations: {max(diffs):.4f}")
compare("ep1_deepep", "ep1_alltoall")
compare("ep4_fp8", "ep4_bf16")
compare("ep4_bf16", "ep1_deepep")
EOF
fi

if [[ $what == table ]]; then
  # The step-time table (issue #11): a subset of runs per call (10 minutes per command), all
  # results collected under $OUT/step_table; `plan` lists the run names.
  python3 scripts/megatron_step_table.py run --out "$OUT/step_table" ${2:+--runs "$2"} \
    --iters "${PROXY_ITERS:-30}" --repeats "${REPEATS:-2}" || status=1
  python3 scripts/megatron_step_table.py table --out "$OUT/step_table" | tee "$OUT/step_table.md"
fi
exit $status
