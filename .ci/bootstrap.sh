# Sourced by tests/run.sh, benchmarks/run.sh and .ci/run: finds or makes a Python with
# torch, ninja, pytest and transformers, builds fused_norm in place against that torch
# (not when sourced with --no-build), and sets $PY.
#
#   FUSED_NORM_VENV=DIR     use (create if needed) this virtual environment
#   FUSED_NORM_TORCH=SPEC   torch requirement to install there, e.g. "torch==2.13.0"
#   FUSED_NORM_CUDA=0|1     passed through to setup.py (force CUDA kernels off/on)
#   FUSED_NORM_CUDA_EMULATION=1
#                           passed through to setup.py (the CUDA kernels for the CPU emulator)
# Without FUSED_NORM_VENV: the current python3 if it already has torch, else ./.venv.
set -euo pipefail
_fn_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${FUSED_NORM_VENV:-}" ] && python3 -c "import torch" 2>/dev/null; then
  PY=$(command -v python3)
else
  _fn_venv=${FUSED_NORM_VENV:-$_fn_root/.venv}
  [ -x "$_fn_venv/bin/python" ] || python3 -m venv "$_fn_venv"
  PY=$_fn_venv/bin/python
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "fused_norm: installing ${FUSED_NORM_TORCH:-torch} into $_fn_venv" >&2
    "$PY" -m pip install -q "${FUSED_NORM_TORCH:-torch}"
  fi
fi
# ninja makes the build parallel, pytest runs the suite, transformers is the test
# dependency of tests/test_models.py and expecttest of tests/test_torch_infos.py (torch's
# test machinery; each skipped without it); skip quietly where offline.
"$PY" -c "import ninja, pytest" 2>/dev/null || "$PY" -m pip install -q ninja pytest numpy || true
"$PY" -c "import transformers" 2>/dev/null || "$PY" -m pip install -q transformers || true
"$PY" -c "import expecttest" 2>/dev/null || "$PY" -m pip install -q expecttest || true
"$PY" -c "import pytest" >/dev/null

[ "${1:-}" = "--no-build" ] && return 0
echo "fused_norm: building against $("$PY" -c 'import torch; print("torch", torch.__version__)') ($PY)" >&2
(cd "$_fn_root" && "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$_fn_root/build.log" 2>&1) || {
  tail -50 "$_fn_root/build.log" >&2
  echo "fused_norm: build failed, full log in build.log" >&2
  exit 1
}
"$PY" -c "import fused_norm, torch; print('fused_norm: built; CUDA kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('fused_norm::layer_norm_fwd', 'CUDA'), '| CPU kernels:', fused_norm.cpu_capability())" >&2
