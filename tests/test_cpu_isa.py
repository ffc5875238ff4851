"""The CPU kernels run on any x86-64: instructions beyond the baseline (SSE2) appear only
in the kernels built for a wider instruction set (the avx2 / avx512 / avx512bf16
namespaces), which run only where the processor has it. Inline functions and templates
that several of those builds share (std::vector, c10 conversions, norm_math.h) are
emitted once by the linker, from any of the builds, so this is checked on the built
library itself: no function outside those namespaces may contain a VEX or EVEX
instruction."""

import re
import shutil
import subprocess

import pytest

import fused_norm

WIDE_NAMESPACES = ("fused_norm::avx2::", "fused_norm::avx512::", "fused_norm::avx512bf16::")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_wide_instructions_only_in_wide_kernels():
    so = fused_norm._C.__file__
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True,
                         check=True).stdout
    offenders, function, kernels = {}, None, 0
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
            kernels += any(ns in function for ns in WIDE_NAMESPACES)
            continue
        fields = line.split("\t")
        # AVX/AVX2/AVX-512 instructions are the VEX/EVEX-encoded ones: mnemonics starting with 'v'.
        if function and len(fields) >= 2 and fields[1].startswith("v") and \
                not any(ns in function for ns in WIDE_NAMESPACES):
            offenders[function] = offenders.get(function, 0) + 1
    assert kernels > 0, "no wide kernels found: the check would prove nothing"
    assert not offenders, f"wide instructions outside the wide kernels: {list(offenders)[:5]}"


@pytest.mark.parametrize("capability", ["baseline", "avx2", "avx512", "avx512bf16"])
def test_capability_names(capability):
    """Every known capability is either selectable or refused with ValueError."""
    current = fused_norm.cpu_capability()
    try:
        fused_norm.set_cpu_capability(capability)
        assert fused_norm.cpu_capability() == capability
    except ValueError as e:
        assert capability in str(e) and capability != "baseline"
    finally:
        fused_norm.set_cpu_capability(current)
