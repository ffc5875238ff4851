"""Build fused_norm against the torch already installed.

    pip install --no-build-isolation .        # or -e . for a development install

The extension is compiled against the torch it will run with, so torch must be installed
first and the build must see it (--no-build-isolation). Objects are kept in
build/obj/<configuration>/ and only what changed is recompiled, whichever command builds.

The CPU kernels are always built. The CUDA kernels are built too when torch is a
CUDA build and a CUDA toolkit is found, whether or not a GPU is present.

Environment:
    FUSED_NORM_CUDA=1 / 0   force the CUDA kernels on (fail if impossible) / off
    FUSED_NORM_CUDA_EMULATION=1
                            also build the CUDA kernels for the CPU emulator (host compiler,
                            any torch; needs the toolkit's headers, not a GPU): with
                            FUSED_NORM_EMULATE_CUDA=1 at run time, ops on CPU tensors run
                            them (see fused_norm.testing). Excludes real CUDA kernels.
    FUSED_NORM_SANITIZE=1   build with AddressSanitizer and UndefinedBehaviorSanitizer
                            (load with libasan preloaded; see tests/run_sanitized.sh)
    FUSED_NORM_COVERAGE=1   build with gcov instrumentation (see tests/emulation/coverage.sh)
    CUDA_HOME, CUDA_PATH    toolkit root; otherwise /usr/local/cuda, then nvcc on PATH
    TORCH_CUDA_ARCH_LIST    default "8.0;9.0;10.0+PTX"
    MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
except ImportError:
    sys.exit(
        "fused_norm: torch is not importable in this build environment.\n"
        "fused_norm's C++/CUDA extension is compiled against the exact torch it will run with, so:\n"
        "  1. install torch first (https://pytorch.org/get-started/locally/), then\n"
        "  2. pip install --no-build-isolation .   (or -e . for a development install)\n"
        "A plain `pip install .` builds in an isolated environment without your torch.")
DEFAULT_ARCH_LIST = "8.0;9.0;10.0+PTX"


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def _nvcc_on_path_root():
    """The toolkit behind `nvcc` on PATH. nvcc may be a wrapper script that execs the real
    one (as in /usr/local/bin/nvcc here), so ask it where it lives instead of guessing
    from the wrapper's path, which is what makes torch pick CUDA_HOME=/usr/local."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        # nvcc --dryrun prints '#$ _HERE_=/usr/local/cuda-13.0/bin'
        if line.startswith("#$ _HERE_="):
            top = os.path.dirname(os.path.normpath(line.split("=", 1)[1].strip()))
            if _is_toolkit(top):
                return top
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if _is_toolkit(root) else None


def find_cuda_home():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _is_toolkit(root):
            return os.path.realpath(root)
    return _nvcc_on_path_root()


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def want_cuda():
    flag = os.environ.get("FUSED_NORM_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return None
    if env_flag("FUSED_NORM_CUDA_EMULATION"):
        if flag in ("1", "on", "true", "yes"):
            sys.exit("FUSED_NORM_CUDA=1 and FUSED_NORM_CUDA_EMULATION=1 exclude each other")
        return None
    cuda_home = find_cuda_home() if torch.version.cuda else None
    if flag in ("1", "on", "true", "yes") and not cuda_home:
        sys.exit("FUSED_NORM_CUDA=1 but " + (
            "torch is a CPU-only build" if not torch.version.cuda else "no CUDA toolkit was found "
            "(set CUDA_HOME to the directory holding bin/nvcc)"))
    return cuda_home


cuda_home = want_cuda()
emulation_home = find_cuda_home() if env_flag("FUSED_NORM_CUDA_EMULATION") else None
if env_flag("FUSED_NORM_CUDA_EMULATION") and not emulation_home:
    sys.exit("FUSED_NORM_CUDA_EMULATION=1 needs the CUDA toolkit's headers (cuda_fp16.h, cuda_runtime.h): "
             "set CUDA_HOME to the toolkit's root")
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def configuration():
    """Names the build configuration: its objects live in build/obj/<this>/."""
    kind = "cuda" if cuda_home else "emulation" if emulation_home else "cpu"
    extras = [f for f in ("SANITIZE", "COVERAGE") if env_flag("FUSED_NORM_" + f)]
    return "-".join([sys.implementation.cache_tag, "torch" + torch.__version__.replace("+", "_"), kind]
                    + [e.lower() for e in extras])


class Build(BuildExtension):
    """torch's BuildExtension (ninja) with objects kept in one place per configuration:
    pip's editable and regular installs otherwise compile in a fresh temporary directory
    each time, so nothing would be reused."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "obj", configuration())

    def build_extensions(self):
        what = ["CPU kernels (baseline, AVX2, AVX-512, AVX-512-BF16 variants, chosen at run time)"]
        if cuda_home:
            what.append("CUDA kernels for " + os.environ["TORCH_CUDA_ARCH_LIST"] + " (nvcc from " + cuda_home + ")")
        if emulation_home:
            what.append("CUDA kernels for the CPU emulator (headers from " + emulation_home + ")")
        print(f"fused_norm: compiling {' and '.join(what)} against torch {torch.__version__}; objects in "
              f"{os.path.relpath(self.build_temp, ROOT)} (only changed sources are recompiled)", flush=True)
        super().build_extensions()

# No FMA contraction: every ISA build rounds the same way (and dx is exactly 0 where it should be).
# -Wno-psabi: vector values (as wide as the ISA's registers) only cross inline functions inside one ISA build.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"]
link_flags = ["-fopenmp"]
sources = sorted(glob.glob("csrc/bindings/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# setuptools skips the extension when no source is newer than the built library; the headers
# count too (ninja then recompiles exactly the objects that include what changed).
headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)
                 + glob.glob("csrc/cuda/*.cu"))  # the .cu files are included by the emulation build
if emulation_home:
    # The .cu files compiled by the host compiler against the emulator, with the half and
    # bfloat16 headers configured as torch's nvcc builds configure them.
    sources += sorted(glob.glob("csrc/cuda/emulator/*.cpp"))
    cxx_flags += ["-DFN_CUDA_EMULATION", "-isystem", os.path.join(emulation_home, "include"),
                  "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                  "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
if not (env_flag("FUSED_NORM_SANITIZE") or env_flag("FUSED_NORM_COVERAGE")):
    cxx_flags.append("-g0")  # Python's flags ask for debug info (the emulation build: 68 MB instead of 8 MB)
if env_flag("FUSED_NORM_SANITIZE"):
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
    cxx_flags += sanitizers + ["-fno-omit-frame-pointer", "-O1"]
    link_flags += sanitizers
if env_flag("FUSED_NORM_COVERAGE"):
    cxx_flags += ["--coverage", "-O0"]
    link_flags += ["--coverage"]
if cuda_home:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension(
        "fused_norm._C",
        sources,
        depends=headers,
        define_macros=[("FUSED_NORM_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "fused_norm._C", sources, depends=headers, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags)

# The metadata is in pyproject.toml. The extension only loads into the torch release it was
# compiled against (torch's C++ API is not stable across releases): say so in the requirements.
torch_release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
setup(
    ext_modules=[extension],
    cmdclass={"build_ext": Build},
    install_requires=[f"torch=={torch_release}.*"],
)
