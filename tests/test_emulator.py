"""The CUDA emulator's checks bite: deliberately broken kernels (tests/emulation/defects.cpp)
are caught, their correct twins pass, under the thread orders the CUDA tests use.

The program is built twice with the host compiler against csrc/cuda/emulator: plainly, and
with AddressSanitizer and UndefinedBehaviorSanitizer (the memory defects: an out-of-bounds
tail, a misaligned 16-byte load). Needs g++ and the CUDA toolkit's headers, not a GPU.
"""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ("forward", "reverse", "random:7")


def _cuda_include():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


pytestmark = pytest.mark.skipif(_cuda_include() is None or shutil.which("g++") is None,
                                reason="needs g++ and the CUDA toolkit's headers")

FLAGS = ["-std=c++20", "-O1", "-g", "-DFN_CUDA_EMULATION", "-Wno-unknown-pragmas",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("emulator")
    built = {}
    for name, extra in (("plain", []), ("sanitized", SANITIZE)):
        exe = str(out / f"defects-{name}")
        subprocess.run(["g++", *FLAGS, *extra, "-isystem", _cuda_include(),
                        os.path.join(ROOT, "tests", "emulation", "defects.cpp"),
                        os.path.join(ROOT, "csrc", "cuda", "emulator", "emulator.cpp"), "-o", exe],
                       check=True, capture_output=True, text=True)
        built[name] = exe
    return built


def _run(exe, *args):
    env = dict(os.environ, FUSED_NORM_EMULATE_CUDA_QUIET="1", ASAN_OPTIONS="detect_leaks=1",
               UBSAN_OPTIONS="print_stacktrace=1")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)


def _results(exe, case, variant):
    """{schedule: CompletedProcess} of one case under every schedule."""
    return {s: _run(exe, case, variant, s) for s in SCHEDULES}


def _values(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    words = proc.stdout.split()
    assert words[0] == "result", proc.stdout
    return [float(w) for w in words[1:]]


CASES = ["missing_syncthreads", "tail_off_by_one", "misaligned_vector", "partial_warp_shuffle",
         "divergent_barrier", "read_before_write"]


@pytest.mark.parametrize("build", ["plain", "sanitized"])
@pytest.mark.parametrize("case", CASES)
def test_correct_kernels_pass(programs, case, build):
    """The correct twin of every defect runs clean under every schedule (and the
    sanitizers), with the same finite results."""
    runs = _results(programs[build], case, "good")
    values = [_values(p) for p in runs.values()]
    assert all(v == values[0] for v in values)
    assert all(v == v and abs(v) != float("inf") for v in values[0])


def test_missing_barrier_changes_results(programs):
    """No __syncthreads between the shared-memory writes and thread 0's reads: thread 0
    reads slots not yet written (NaN poison) under some schedule. The reverse order
    alone would hide it; the three together do not."""
    good = _values(_run(programs["plain"], "missing_syncthreads", "good", "forward"))
    runs = _results(programs["plain"], "missing_syncthreads", "bad")
    got = {s: _values(p) for s, p in runs.items()}
    assert any(v != good for v in got.values()), got
    assert got["reverse"] == good  # the order that hides it


def test_shared_read_before_write_shows_nan(programs):
    for s, p in _results(programs["plain"], "read_before_write", "bad").items():
        assert all(v != v for v in _values(p)), s


@pytest.mark.parametrize("case,message", [
    ("partial_warp_shuffle", "names lane 16, which has exited|wait for it at __shfl_xor_sync"),
    ("divergent_barrier", "divergent barrier|exits while .* wait at __syncthreads"),
])
def test_emulator_reports(programs, case, message):
    """A full-mask shuffle where only half the warp takes part, and a barrier inside a
    divergent branch, stop the launch with a report of where it happened and every
    thread's state (the shuffle under every schedule, the barrier under at least one)."""
    runs = {s: subprocess.run([programs["plain"], case, "bad", s], capture_output=True, text=True, timeout=120)
            for s in SCHEDULES}
    failed = {s: p for s, p in runs.items() if p.returncode == 2}
    assert failed, {s: p.stdout for s, p in runs.items()}
    if case == "partial_warp_shuffle":
        assert len(failed) == len(SCHEDULES)
    for p in failed.values():
        assert "unspecified launch failure" in p.stdout
        assert re.search(message, p.stderr), p.stderr
        assert "defects.cpp:" in p.stderr and "thread states:" in p.stderr


@pytest.mark.parametrize("case,report", [
    ("tail_off_by_one", "AddressSanitizer: heap-buffer-overflow"),
    ("misaligned_vector", "misaligned address"),
])
def test_sanitizers_catch_memory_defects(programs, case, report):
    for s, p in _results(programs["sanitized"], case, "bad").items():
        assert p.returncode != 0, (s, p.stdout)
        assert report in p.stderr, (s, p.stderr[-2000:])


@pytest.mark.parametrize("build", ["plain", "sanitized"])
def test_collectives_match_their_definitions(programs, build):
    """Shuffles (idx, up, down, xor) at every width, votes, disjoint-mask meetings and
    __half / __nv_bfloat16 / 24-byte values."""
    for s in SCHEDULES:
        p = _run(programs[build], "collectives", s)
        assert p.returncode == 0 and p.stdout.strip() == "failures 0", (s, p.stdout, p.stderr[-2000:])


def test_launch_limits(programs):
    """Block, grid and shared-memory limits of the device; the opt-in attribute; the
    H100's SM count; errors as the runtime returns them."""
    p = _run(programs["plain"], "limits")
    assert p.returncode == 0 and p.stdout.strip() == "failures 0", p.stdout
