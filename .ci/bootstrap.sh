# Sourced by tests/run.sh, benchmarks/run.sh and .ci/run: finds or makes a Python with
# torch, ninja, pytest and transformers, builds fused_norm in place against that torch
# (not when sourced with --no-build), and sets $PY.
#
#   FUSED_NORM_VENV=DIR     use (create if needed) this virtual environment
#   FUSED_NORM_TORCH=SPEC   torch requirement to install there, e.g. "torch==2.13.0" (default:
#                           the CPU build when no NVIDIA driver is visible, else "torch")
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
    if [ -n "${FUSED_NORM_TORCH:-}" ]; then
      echo "fused_norm: installing $FUSED_NORM_TORCH into $_fn_venv" >&2
      "$PY" -m pip install -q "$FUSED_NORM_TORCH"
    elif command -v nvidia-smi >/dev/null; then
      echo "fused_norm: installing torch (a CUDA build: about 5.7 GB) into $_fn_venv" >&2
      "$PY" -m pip install -q torch
    else
      # Without a GPU the CPU build (about 1.3 GB installed) is all that is needed; the
      # default Linux wheel on PyPI is the CUDA build.
      echo "fused_norm: no NVIDIA driver visible: installing the CPU build of torch into $_fn_venv" >&2
      "$PY" -m pip install -q --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch \
        || { echo "fused_norm: the CPU index is not reachable: installing torch from the default index" >&2
             "$PY" -m pip install -q torch; }
    fi
  fi
fi
# ninja makes the build parallel, pytest runs the suite, transformers is the test
# dependency of tests/test_models.py and expecttest of tests/test_torch_infos.py (torch's
# test machinery; each skipped without it); skip quietly where offline.
_fn_missing=$("$PY" -c "import importlib.util as u
print(*[m for m in ('ninja', 'pytest', 'numpy', 'transformers', 'expecttest') if u.find_spec(m) is None])")
[ -z "$_fn_missing" ] || "$PY" -m pip install -q $_fn_missing || true
"$PY" -c "import pytest" >/dev/null

[ "${1:-}" = "--no-build" ] && return 0
# Nothing to do when this Python, torch, the build settings and every source are as they
# were at the last successful build (pip alone takes ~15 s to find that out).
_fn_stamp=$(cd "$_fn_root" && {
  echo "$PY"; "$PY" -c "import importlib.metadata as m; print(m.version('torch'))"
  env | grep -E '^(FUSED_NORM_(CUDA|CUDA_EMULATION|SANITIZE|COVERAGE)|CUDA_HOME|CUDA_PATH|TORCH_CUDA_ARCH_LIST|CXX|CC)=' | sort
  find setup.py pyproject.toml csrc -type f -print0 | sort -z | xargs -0 sha1sum
} | sha1sum)
# ... and the library is the one that build made (not one another build put in its place).
_fn_library() { stat -c '%n %s %Y' "$_fn_root"/fused_norm/_C*.so 2>/dev/null || true; }
if [ "$(cat "$_fn_root/build/bootstrap.stamp" 2>/dev/null)" = "$_fn_stamp $(_fn_library)" ]; then
  echo "fused_norm: up to date (no source or build setting changed since the last build)" >&2
  return 0
fi
echo "fused_norm: building against $("$PY" -c 'import torch; print("torch", torch.__version__)') ($PY); full log in build.log" >&2
# The build keeps its objects in build/obj/ and recompiles only what changed (setup.py). Its
# verbose output goes to build.log; ninja's [n/N] steps are shown as they happen.
(cd "$_fn_root" && "$PY" -m pip install -v --no-build-isolation --no-deps -e . 2>&1) | tee "$_fn_root/build.log" \
  | awk '{sub(/^ +/, "")}  # pip indents the backend output
         /^fused_norm:/ {print; fflush(); next}
         /^\[[0-9]+\/[0-9]+\] / {src = ""; for (i = 2; i <= NF; i++) if ($i ~ /\/csrc\/.*\.(cpp|cu)$/) src = $i
                                sub(/.*\/csrc\//, "csrc/", src); print "  " $1 " compiling " src; fflush(); next}
         /^ninja: no work to do/ {print "  nothing to recompile"; fflush(); next}
         / -shared / {print "  linking fused_norm/_C"; fflush()}' >&2 || {
  tail -50 "$_fn_root/build.log" >&2
  echo "fused_norm: build failed, full log in build.log" >&2
  exit 1
}
mkdir -p "$_fn_root/build" && echo "$_fn_stamp $(_fn_library)" >"$_fn_root/build/bootstrap.stamp"
"$PY" - >&2 <<'PYEOF'
import torch
import fused_norm
cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fused_norm::layer_norm_fwd", "CUDA")
if not cuda:
    from fused_norm import testing
    gpu = "not built (CPU-only torch)" + ("; built for the CPU emulator" if testing.emulation_available() else "")
elif torch.cuda.is_available():
    gpu = "built, running on " + torch.cuda.get_device_name()
else:
    gpu = "built, but no GPU is visible here, so only the CPU kernels run"
print(f"fused_norm {fused_norm.__version__} ready (torch {torch.__version__}): CPU kernels {fused_norm.cpu_capability()}; "
      f"CUDA kernels {gpu}")
PYEOF
