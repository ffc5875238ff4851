#!/usr/bin/env bash
# Line coverage of csrc/cuda (launchers and kernels) under the emulated kernel tests:
# builds the emulation build with gcov instrumentation into build/coverage (a third build,
# so not part of CI), runs tests/test_cuda_emulation.py against it and prints, per file,
# the lines executed (gcov's executable lines, merged over the two emulated translation
# units) and the lines never reached. Extra arguments go to pytest.
case " $* " in *" -h "* | *" --help "*) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # no build for --help
set -euo pipefail
source "$(dirname "$0")/../../.ci/bootstrap.sh" --no-build
cd "$_fn_root"
out=$_fn_root/build/coverage
mkdir -p "$out"
FUSED_NORM_CUDA_EMULATION=1 FUSED_NORM_COVERAGE=1 FUSED_NORM_CUDA=0 "$PY" setup.py -q build_ext \
  --build-lib "$out" >"$out.log" 2>&1 || { tail -50 "$out.log" >&2; exit 1; }
cp fused_norm/*.py "$out/fused_norm/"
find "$out/temp" -name "*.gcda" -delete
(cd "$out" && "$PY" -m pytest "$_fn_root/tests/test_cuda_emulation.py" -q -p no:cacheprovider "$@")
rm -rf "$out/gcov" && mkdir -p "$out/gcov" && cd "$out/gcov"
for tu in layer_norm batch_norm; do
  mkdir -p "$tu" && (cd "$tu" && gcov -p -o "$out/temp/csrc/cuda/emulator" \
    "$_fn_root/csrc/cuda/emulator/$tu.cpp" >/dev/null)
done
"$PY" - "$_fn_root" <<'PYEOF'
import glob, os, sys
root = sys.argv[1]
hits = {}  # file -> {line: executed?}
for path in glob.glob("*/*.gcov"):
    lines = open(path, errors="replace").read().splitlines()
    src = lines[0].split("Source:", 1)[1].strip()
    src = os.path.normpath(src)
    rel = os.path.relpath(src, root)
    if not rel.startswith("csrc/cuda/") or "/emulator/" in rel:
        continue
    for line in lines[1:]:
        fields = line.split(":", 2)
        if len(fields) < 3:  # separators and headers of template instantiations
            continue
        count, num = fields[0].strip(), fields[1].strip()
        if count == "-" or not num.isdigit() or int(num) == 0:
            continue
        hit = not count.startswith("#####") and not count.startswith("=====")
        hits.setdefault(rel, {})
        hits[rel][int(num)] = hits[rel].get(int(num), False) or hit
total = reached = 0
for rel in sorted(hits):
    lines = hits[rel]
    done = sum(lines.values())
    total += len(lines)
    reached += done
    missed = sorted(n for n, h in lines.items() if not h)
    print(f"{rel}: {done}/{len(lines)} lines ({100 * done / len(lines):.1f}%)")
    if missed:
        print("   not reached:", ", ".join(map(str, missed)))
print(f"csrc/cuda total: {reached}/{total} lines ({100 * reached / total:.1f}%)")
PYEOF
