"""Shared test helpers: the devices to run on and accuracy comparisons against torch."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_norm  # noqa: F401  (registers the ops)


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_norm::layer_norm_fwd", "CUDA")


CUDA_OK = torch.cuda.is_available() and _has_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels"))]


def cpu_capabilities():
    """The CPU instruction sets this processor can run our kernels with."""
    current = fused_norm.cpu_capability()
    out = []
    for cap in ("baseline", "avx2", "avx512", "avx512bf16"):
        try:
            fused_norm.set_cpu_capability(cap)
            out.append(cap)
        except ValueError:
            pass
    fused_norm.set_cpu_capability(current)
    return out


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whichever tests ran before it (or
    were deselected), so a failure reproduces when the test runs alone."""
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def cpu_capability(request):
    """Runs the test with the CPU kernels forced to request.param, then restores."""
    current = fused_norm.cpu_capability()
    fused_norm.set_cpu_capability(request.param)
    yield request.param
    fused_norm.set_cpu_capability(current)


class count_fused_calls(TorchDispatchMode):
    """Counts the calls of torch.ops.fused_norm.* made inside it (in `.n`), as proof that
    fused_norm's kernels ran and not torch's (it sees calls from TorchScript too)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_norm":
            self.n += 1
        return func(*args, **(kwargs or {}))


def torch_norm_class(module):
    """The torch.nn class a (possibly converted) norm module derives from."""
    return next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_to_reference(ours, theirs, ref, dtype, what=""):
    """ours and theirs (torch) computed in `dtype`, ref in float64 from the same inputs.
    fp32/fp64: ours must match torch within assert_close defaults, or else be no further
    from the fp64 reference than torch is (ill-conditioned rows). fp16/bf16: ours' error
    against the reference is no worse than torch's plus one ulp of the output scale."""
    ours = ours.double()
    theirs = theirs.double()
    ref = ref.double()
    if dtype in (torch.float32, torch.float64):
        try:
            torch.testing.assert_close(ours.to(dtype), theirs.to(dtype), equal_nan=True)
            return
        except AssertionError:
            pass
    err_ours = (ours - ref).abs()
    err_theirs = (theirs - ref).abs()
    if dtype in (torch.float16, torch.bfloat16):
        slack = ulp(dtype) * ref.abs().clamp_min(1.0)
    else:  # a few ulps of the value: rounding of the last operations differs
        slack = 4 * ulp(dtype) * ref.abs()
    bad = ~((err_ours <= err_theirs + slack) | (ours.isnan() & ref.isnan()))
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements further from fp64 than torch (+slack); first at {i}: "
            f"ours={ours[tuple(i)].item()} torch={theirs[tuple(i)].item()} ref={ref[tuple(i)].item()}")


def assert_gradients_of_every_subset(ours, theirs, call, x, weight, bias, dy):
    """For every subset of the given tensors among x, weight and bias (None: absent)
    requiring grad (frozen parameters, a frozen input, none), call(fn, x, weight, bias)
    with fn = ours and theirs gives outputs that require grad exactly when one of them
    does, and the same gradients; under no_grad, no graph at all."""
    given = [t for t in (x, weight, bias) if t is not None]
    for mask in range(1 << len(given)):
        grads = []
        for fn in (ours, theirs):
            leaves = iter([t.detach().clone().requires_grad_(bool(mask >> i & 1)) for i, t in enumerate(given)])
            args = [next(leaves) if t is not None else None for t in (x, weight, bias)]
            y = call(fn, *args)
            assert y.requires_grad == bool(mask)
            wanted = [t for t in args if t is not None and t.requires_grad]
            grads.append(torch.autograd.grad(y, wanted, dy) if wanted else ())
            with torch.no_grad():
                assert not call(fn, *args).requires_grad
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)
