#!/usr/bin/env bash
# One device call that runs several GPU checks in order, each under its own time limit, within an
# overall deadline, for a machine with an NVIDIA GPU, run from the repository root:
#
#   scripts/device_session.sh STEP [STEP...]
#
# Steps, in the order given. A test step written STEP:EXPR runs only the tests that pytest's
# -k EXPR selects. Each step's log goes to $OUT/logs/STEP.log; a step that would start with less
# than 40 s left before the deadline is skipped and said so, and none runs past it:
#   build           build _C and _nvshmem unless .device-ext/ holds ones that import; pack them
#                   into $OUT/device-ext.tar.gz (unpack into .device-ext/ and carry it next time)
#   translate       C++ timeouts reach Python as TimeoutError from both modules (no GPU needed;
#                   the toolchain and pybind11 versions are logged)
#   intranode       tests/test_gpu_intranode.py (not the soak)
#   intranode-soak  its 1,000-iteration soak
#   oversub streams tests/test_gpu_oversubscription.py, tests/test_gpu_streams.py
#   ll              tests/test_gpu_low_latency.py
#   internode       tests/test_gpu_internode.py
#   fp8-table       the intranode bench at R=2/24, 4/8, 8/16 SMs (BF16, FP8 and combine times)
#   ll-bench        the low-latency bench, R=8 and R=2, 16 SMs, plain and hook mode
#   internode-bench R=8 as 2x4 and 4x2 nodes, and R=8 intranode, 16 SMs
#   megatron        the Megatron GPU tests (needs .whl/, see scripts/device_megatron_check.sh)
#   table:RUNS      scripts/megatron_step_table.py runs RUNS (comma-separated)
#   proxy-nodes     the DeepSeek-V3 proxy at EP=4 as 2 emulated nodes x 2: internode kernels vs
#                   the portable backend, same seed; losses compared (needs .whl/)
#   trace           scripts/moe_layer_trace.py at EP=4 on one GPU: how much of one MoE layer's
#                   dispatch/combine time the shared expert hides; $OUT/trace/ (summary.json,
#                   timeline.png, the gzipped chrome trace where it is small enough to come back)
#   compare         scripts/device_bench_compare.sh .stage-base: the benchmark of a baseline
#                   checkout and of this tree in one call (make it first, e.g.
#                   `git archive 134d62a | tar -x -C .stage-base`, and delete it afterwards)
#
# DEADLINE (seconds from start, default 570) keeps the whole call inside the device's 10-minute
# limit. Results: $OUT/summary.txt (one line per step: status, seconds), $OUT/logs.tar.gz.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export OUT LOGS  # the step functions run in child shells
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} WANDB_MODE=${WANDB_MODE:-offline}
export DEEPEP_MEGATRON_EXTENSIONS=_C,_nvshmem DEEPEP_MEGATRON_CRASH_REPORT=1
DEADLINE=${DEADLINE:-570}
SUMMARY=$OUT/summary.txt

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout LIMIT_S` (shortened to the time left)
# with its output in $LOGS/NAME.log, and one summary line.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 40)); then
    echo "$name: skipped ($left s left)" | tee -a "$SUMMARY"
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  # bash -c: the command may be one of the functions below (exported), which timeout cannot run.
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT at $limit s" || { ((rc != 0)) && verdict="FAILED rc=$rc"; }
  echo "$name: $verdict in $((SECONDS - start)) s | $(grep -E '[0-9]+ (passed|failed|skipped|errors?)( |,|$)' "$LOGS/$name.log" | tail -1)" |
    tee -a "$SUMMARY"
}

pytest_gpu() { # pytest over GPU-marked tests, -s so rank processes' own output lands in the log
  python3 -m pytest -q -s -rs -m gpu -p no:cacheprovider --timeout 300 --durations 15 "$@"
}

build() {
  if ls .device-ext/deepep_megatron/*.so >/dev/null 2>&1; then
    cp .device-ext/deepep_megatron/*.so deepep_megatron/
  fi
  if python3 -c "import torch, deepep_megatron._C, deepep_megatron._nvshmem as m; m.InternodeRuntime"; then
    echo "prebuilt extension modules import"
    return 0
  fi
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace -j 16 || return 1
  # Without debug sections the modules come back (about 4 MB packed, under the 16 MiB limit).
  mkdir -p /tmp/ext/deepep_megatron && cp deepep_megatron/*.so /tmp/ext/deepep_megatron/
  strip --strip-debug /tmp/ext/deepep_megatron/*.so
  tar -C /tmp/ext -czf "$OUT/device-ext.tar.gz" deepep_megatron
}

translate() {
  /opt/gcc/bin/g++ --version 2>/dev/null | head -1; g++ --version | head -1
  grep -h "define PYBIND11_VERSION_M" "$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')"/include/pybind11/detail/common.h
  python3 -m pytest -q -p no:cacheprovider tests/test_extension_build.py
}

bench_intranode() { # the FP8 table's three (R, SMs) pairs
  for pair in 2:24 4:8 8:16; do
    python3 -m deepep_megatron.bench --nproc "${pair%%:*}" --num-sms "${pair#*:}" --routing random \
      --backend cuda --timeout 120 --json "$LOGS/bench_r${pair%%:*}_s${pair#*:}.json" || return 1
  done
}

bench_low_latency() {
  for ranks in 8 2; do
    for mode in "" --hook; do
      python3 -m deepep_megatron.bench --low-latency $mode --nproc "$ranks" --num-sms 16 --routing random \
        --backend cuda --timeout 100 --json "$LOGS/ll_bench_r$ranks${mode:+_hook}.json" || return 1
    done
  done
}

bench_internode() {
  for per_node in 4 2; do
    python3 -m deepep_megatron.bench --nproc 8 --num-ranks-per-node "$per_node" --num-sms 16 --backend cuda \
      --timeout 120 --json "$LOGS/internode_bench_node$per_node.json" || return 1
  done
  python3 -m deepep_megatron.bench --nproc 8 --num-sms 16 --backend cuda --timeout 120 \
    --json "$LOGS/intranode_bench_r8.json"
}

proxy_nodes() { # EP=4 over 2 emulated nodes, internode kernels vs portable backend
  set -o pipefail
  for backend in auto portable; do
    python3 -m deepep_megatron.launch --nproc 4 examples/pretrain_deepseek_v3/pretrain.py --config "${PROXY_CONFIG:-proxy}" \
      --train-iters "${PROXY_ITERS:-10}" --expert-model-parallel-size 4 --distributed-backend gloo \
      --deepep-num-ranks-per-node 2 --deepep-backend "$backend" --wandb-save-dir "$LOGS/wandb" \
      --metrics-jsonl "$LOGS/proxy_nodes_$backend.jsonl" 2>&1 | grep -E "^\[pretrain\]|^iter" || return 1
  done
  python3 - "$LOGS" <<'PY'
import json, pathlib, sys
logs = pathlib.Path(sys.argv[1])
runs = {b: [json.loads(l) for l in (logs / f"proxy_nodes_{b}.jsonl").read_text().splitlines()] for b in ("auto", "portable")}
diffs = [abs(a["train/loss"] - p["train/loss"]) for a, p in zip(runs["auto"], runs["portable"])]
print(f"max |loss(internode) - loss(portable)| over {len(diffs)} iterations: {max(diffs):.5f}")
PY
}

moe_layer_trace() {
  set -o pipefail
  python3 -m deepep_megatron.launch --nproc 4 scripts/moe_layer_trace.py --out "$OUT/trace" --backend cuda || return 1
  gzip -f "$OUT/trace/trace_rank0.json" && find "$OUT/trace" -name "*.gz" -size +15M -delete
}

install_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
  fi
  python3 -c "import megatron.core, wandb; print('megatron-core', megatron.core.__version__)"
}
export PYTHONPATH=/tmp/site:$PYTHONPATH
export -f pytest_gpu build translate bench_intranode bench_low_latency bench_internode proxy_nodes moe_layer_trace install_wheels

nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader | tee "$SUMMARY"
for name in "$@"; do
  # STEP:EXPR runs a test step's tests selected by pytest's -k EXPR (e.g. intranode:absent).
  filter=()
  [[ $name == *:* && $name != table:* ]] && filter=(-k "${name#*:}")
  log=${name//[^A-Za-z0-9_-]/_}
  case ${name%%:*} in
  build) step build 300 build ;;
  translate) step translate 60 translate ;;
  intranode) step "$log" 300 pytest_gpu tests/test_gpu_intranode.py -m "gpu and not slow" "${filter[@]}" ;;
  intranode-soak) step intranode-soak 300 pytest_gpu tests/test_gpu_intranode.py -m "gpu and slow" ;;
  oversub) step oversub 200 pytest_gpu tests/test_gpu_oversubscription.py ;;
  streams) step streams 120 pytest_gpu tests/test_gpu_streams.py ;;
  ll) step "$log" 300 pytest_gpu tests/test_gpu_low_latency.py "${filter[@]}" ;;
  internode) step "$log" 480 pytest_gpu tests/test_gpu_internode.py "${filter[@]}" ;;
  fp8-table) step fp8-table 300 bench_intranode ;;
  ll-bench) step ll-bench 240 bench_low_latency ;;
  internode-bench) step internode-bench 300 bench_internode ;;
  megatron)
    step wheels 60 install_wheels
    step megatron 480 pytest_gpu tests/test_megatron_dispatcher.py tests/test_megatron_pretrain.py \
      tests/test_megatron_flex.py tests/test_megatron_overlap.py tests/test_megatron_grouped_experts.py \
      tests/test_megatron_dispatcher_options.py --timeout 480
    ;;
  table)
    step wheels 60 install_wheels
    step table 480 python3 scripts/megatron_step_table.py run --out "$LOGS/step_table" --runs "${name#table:}" \
      --iters "${PROXY_ITERS:-30}" --repeats "${REPEATS:-2}"
    python3 scripts/megatron_step_table.py table --out "$LOGS/step_table" >"$OUT/step_table.md" 2>&1
    ;;
  proxy-nodes)
    step wheels 60 install_wheels
    step proxy-nodes 400 proxy_nodes
    ;;
  trace)
    step wheels 60 install_wheels
    step trace 300 moe_layer_trace
    ;;
  compare) step compare 540 bash scripts/device_bench_compare.sh .stage-base ;;
  *) echo "$name: unknown step" | tee -a "$SUMMARY" ;;
  esac
done
# GPU faults (Xid) the driver logged during the call, if the kernel log can be read.
dmesg 2>/dev/null | grep -iE "xid|nvrm" | tail -40 >"$LOGS/driver_messages.log"
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"
