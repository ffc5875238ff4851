#!/usr/bin/env bash
# Runs the emulated CUDA kernel tests (tests/test_cuda_emulation.py) against a build made
# with AddressSanitizer and UndefinedBehaviorSanitizer: out-of-bounds and misaligned
# accesses, use of freed memory and undefined behaviour in the kernels, launchers and
# bindings abort the run with a report. The build goes to build/sanitized (the regular
# in-place build is left alone) and is incremental. Needs the CUDA toolkit's headers
# (CUDA_HOME), not a GPU. Extra arguments go to pytest.
case " $* " in *" -h "* | *" --help "*) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # no build for --help
set -euo pipefail
source "$(dirname "$0")/../.ci/bootstrap.sh" --no-build
cd "$_fn_root"
out=$_fn_root/build/sanitized
mkdir -p "$out"
echo "fused_norm: building the sanitized emulation build in $out" >&2
FUSED_NORM_CUDA_EMULATION=1 FUSED_NORM_SANITIZE=1 FUSED_NORM_CUDA=0 "$PY" setup.py -q build_ext \
  --build-lib "$out" >"$out.log" 2>&1 || {
  tail -50 "$out.log" >&2
  echo "fused_norm: sanitized build failed, full log in $out.log" >&2
  exit 1
}
cp fused_norm/*.py "$out/fused_norm/"
# Python itself is not instrumented: the sanitizer runtime is preloaded, with libstdc++
# (whose __cxa_throw ASan intercepts: torch's errors are C++ exceptions). Leaks are not
# checked (the interpreter's own allocations would report).
preload="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
cd "$out"  # so that `import fused_norm` finds the sanitized package first
LD_PRELOAD=$preload ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  exec "$PY" -m pytest "$_fn_root/tests/test_cuda_emulation.py" -q -p no:cacheprovider "$@"
