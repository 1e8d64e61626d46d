#!/usr/bin/env bash
# The project's main job, set up from scratch: create/refresh .venv (scripts/setup_env.sh), then
# benchmark dispatch/combine on the portable backend over 4 CPU ranks with small sizes
# (256 tokens per rank, hidden 1024, top-8 of 256 experts; random and group-limited routing).
# Results: a table on stdout, bench_out/main.json and bench_out/main.png.
# Extra arguments go to the benchmark (python -m deepep_megatron.bench --help).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
VENV=${DEEPEP_MEGATRON_VENV:-.venv}
exec "$VENV/bin/python" -m deepep_megatron.bench --device cpu --backend portable --nproc 4 \
  --json bench_out/main.json --plot bench_out/main.png "$@"
