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

import torch

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


def _special_floats():
    """float32 values at the edges of rounding to 16 bits: denormals, NaN of both signs,
    infinities, overflow, ties to even, and ordinary values."""
    bits = [0x00000001, 0x80000001, 0x007FFFFF, 0x00400000, 0x80400000,  # denormals
            0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF,  # NaNs (quiet, signaling, negative)
            0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,  # infinities, largest finite
            0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties and near-ties at 1
            0x00800000, 0x80800000, 0x00000000, 0x80000000]  # smallest normals, zeros
    special = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    ordinary = torch.randn(43, generator=torch.Generator().manual_seed(3))
    return torch.cat([special, ordinary, special.flip(0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_to_storage_is_torch_s(dtype):
    """y = xhat * 0 + bias with float32 parameters is the float32 bias (a zero taking the
    sign of xhat * 0) rounded to the output dtype: every instruction set must round each
    value, special ones included, as torch's own conversion does (NaN as NaN)."""
    b = _special_floats()
    n = b.numel()
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(4)).to(dtype)
    w = torch.zeros(n)
    # float32 y (xhat * 0 is a zero of xhat's sign), rounded by torch's conversion
    expected = torch.nn.functional.layer_norm(x.float(), (n,), w, b).to(dtype)
    current = fused_norm.cpu_capability()
    try:
        for capability in ("baseline", "avx2", "avx512", "avx512bf16"):
            try:
                fused_norm.set_cpu_capability(capability)
            except ValueError:
                continue
            y = fused_norm.layer_norm(x, (n,), w, b)
            nan = expected.isnan()
            assert torch.equal(y.isnan(), nan), capability
            assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16)), capability
    finally:
        fused_norm.set_cpu_capability(current)
