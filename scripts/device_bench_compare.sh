#!/usr/bin/env bash
# Before/after benchmark in one GPU session: builds the extension of a baseline checkout and of
# this tree side by side, then runs `python -m deepep_megatron.bench` on each, alternating, at the
# (ranks, SMs) pairs of the targets (docs/benchmarking.md), random routing.
#
#   scripts/device_bench_compare.sh BASE_DIR [ROUNDS]
#
# BASE_DIR: a copy of the baseline sources (e.g. `git archive <rev> | tar -x -C .stage-base`,
# carried to the GPU machine). ROUNDS (default 1): how many times each variant runs per pair, so
# run-to-run noise shows. The summary table goes to $OUT/compare.md and every run's log to
# $OUT/compare_runs.log (default ./gpu_out); the per-run JSON stays in $BENCH_DIR (/tmp/bench).
set -uo pipefail
base=${1:?usage: device_bench_compare.sh BASE_DIR [ROUNDS]}
rounds=${2:-1}
OUT=${OUT:-$PWD/gpu_out}
BENCH_DIR=${BENCH_DIR:-/tmp/bench}
mkdir -p "$OUT" "$BENCH_DIR"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0

build() {  # build the extension in place in $1 unless it imports there, logging to $BENCH_DIR/build_$2.log
  (cd "$1" && PYTHONPATH=$1 python3 -c "import deepep_megatron._C" 2>/dev/null) && return 0
  (cd "$1" && MAX_JOBS=8 python3 setup.py build_ext --inplace -j 8 >"$BENCH_DIR/build_$2.log" 2>&1) ||
    { echo "build of $2 failed"; tail -30 "$BENCH_DIR/build_$2.log"; return 1; }
}
start=$(date +%s)
build "$base" base & base_pid=$!
build "$PWD" new & new_pid=$!
wait $base_pid || exit 1
wait $new_pid || exit 1
echo "built both in $(( $(date +%s) - start )) s"

pairs=${PAIRS:-"8:16 2:24 4:8"}
for round in $(seq 1 "$rounds"); do
  for pair in $pairs; do
    ranks=${pair%%:*} sms=${pair#*:}
    for variant in base new; do
      dir=$PWD; [ $variant = base ] && dir=$base
      name=bench_${variant}_r${ranks}_s${sms}_${round}
      (cd "$dir" && PYTHONPATH=$dir timeout 300 python3 -m deepep_megatron.bench --nproc "$ranks" \
        --num-sms "$sms" --routing random --json "$BENCH_DIR/$name.json") >"$BENCH_DIR/$name.log" 2>&1 ||
        { echo "bench $variant R=$ranks SMs=$sms failed"; tail -20 "$BENCH_DIR/$name.log"; }
      { echo "=== $name"; cat "$BENCH_DIR/$name.log"; } >>"$OUT/compare_runs.log"
    done
  done
done

python3 - "$OUT" "$BENCH_DIR" <<'PY'
import glob, json, os, sys
out, bench_dir = sys.argv[1], sys.argv[2]
rows = {}
for path in sorted(glob.glob(os.path.join(bench_dir, "bench_*.json"))):
    variant, r, s, rnd = os.path.basename(path)[6:-5].split("_")
    report = json.load(open(path))
    for row in report["results"]:
        us = sum(row["median_s"]) / len(row["median_s"]) * 1e6
        rows.setdefault((r, s, row["op"]), {}).setdefault(variant, []).append((row["gbps_mean"], us))
lines = ["| R | SMs | op | base GB/s (us) | new GB/s (us) | new/base |", "|---|---|---|---|---|---|"]
for (r, s, op), by in sorted(rows.items()):
    def fmt(v):
        return ", ".join(f"{g:.1f} ({u:.0f})" for g, u in by.get(v, [])) or "-"
    ratio = "-"
    if by.get("base") and by.get("new"):
        ratio = f"{max(g for g, _ in by['new']) / max(g for g, _ in by['base']):.2f}"
    lines.append(f"| {r[1:]} | {s[1:]} | {op} | {fmt('base')} | {fmt('new')} | {ratio} |")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "compare.md"), "w").write(text + "\n")
PY
