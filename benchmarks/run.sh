#!/usr/bin/env bash
# Builds fused_norm (see .ci/bootstrap.sh) and benchmarks it against its peers on the device
# present (CUDA when available, else CPU). Extra arguments go to benchmarks/bench.py, e.g.
#   bash benchmarks/run.sh --quick          # smoke run
#   bash benchmarks/run.sh --help           # sweeps, ops, dtypes, peers, output directory
# Results go to a new folder benchmarks/out/<device>-<date>-<time>/ unless --out names one.
set -euo pipefail
# --help and --list only describe the benchmark: they never build.
for arg in "$@"; do
  case "$arg" in
    -h|--help|--list)
      source "$(dirname "$0")/../.ci/bootstrap.sh" --no-build
      cd "$_fn_root"
      exec "$PY" benchmarks/bench.py "$@" ;;
  esac
done
source "$(dirname "$0")/../.ci/bootstrap.sh"
cd "$_fn_root"
# Plots and the progress bar need matplotlib and tqdm; the benchmark runs without them (offline).
"$PY" -c "import matplotlib, tqdm" 2>/dev/null \
  || "$PY" -m pip install -q --retries 1 --timeout 15 matplotlib tqdm >/dev/null 2>&1 \
  || echo "fused_norm: matplotlib/tqdm not installable here: no plots, text progress" >&2
exec "$PY" benchmarks/bench.py "$@"
