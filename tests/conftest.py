"""Shared test helpers: the devices to run on and accuracy comparisons against torch."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_norm  # noqa: F401  (registers the ops)
from fused_norm import testing


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_norm::layer_norm_fwd", "CUDA")


CUDA_OK = torch.cuda.is_available() and _has_cuda_kernels()
EMULATION_OK = testing.emulation_available()
# "emulated": CPU tensors, run through the CUDA kernels under the CPU emulator (a build
# made with FUSED_NORM_CUDA_EMULATION=1), in a seeded random thread order with 3 SMs.
DEVICES = [
    "cpu",
    pytest.param("emulated", marks=pytest.mark.skipif(not EMULATION_OK, reason="built without the CUDA emulator")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")),
]
EMULATED_SCHEDULE = "random:1"

# (x dtype, parameter/buffer dtype): plain and mixed precision (the usual AMP setup).
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16", "bf16+fp32w", "fp16+fp32w"]
EMULATED_SMS = 3


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
    """The device to put tensors on; for "emulated", "cpu" with emulation on, and the test
    must have launched emulated kernels (not only the CPU ones, nor none)."""
    if request.param != "emulated":
        yield request.param
        return
    with testing.emulate_cuda(schedule=EMULATED_SCHEDULE, sms=EMULATED_SMS):
        before = testing.emulated_launches()
        yield "cpu"
        launched = testing.emulated_launches() - before
    report = getattr(request.node, "report_call", None)
    if report is not None and report.passed and request.node.get_closest_marker("no_kernels") is None:
        assert launched > 0, "no emulated CUDA kernel ran"


def pytest_configure(config):
    config.addinivalue_line("markers", "no_kernels: the test launches no kernel on purpose (empty inputs, "
                                       "argument errors), so its emulated run is not required to")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps the test's own outcome on the item, for fixtures' teardown."""
    outcome = yield
    if call.when == "call":
        item.report_call = outcome.get_result()


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


def raises_like_torch(ours, theirs):
    """ours() raises the exception type torch's theirs() raises, with its first line."""
    with pytest.raises(Exception) as t:
        theirs()
    with pytest.raises(type(t.value)) as o:
        ours()
    assert str(o.value).splitlines()[0] == str(t.value).splitlines()[0]


def assert_accurate(ours, theirs, ref, dtype, what, ulps=4):
    """assert_close_to_reference, or else, where torch's kernels and ours round
    differently element by element (torch's CPU kernels sum in float in places, our CPU
    kernels in double, our CUDA kernels in float in another order), ours passes if its
    largest error against fp64 is no worse than torch's plus `ulps` ulps (fp32/fp64; one
    for fp16/bf16) of the largest value."""
    try:
        assert_close_to_reference(ours, theirs, ref, dtype, what)
    except AssertionError:
        ref = ref.double()
        err_ours = (ours.double() - ref).abs().max()
        err_theirs = (theirs.double() - ref).abs().max()
        slack = (ulps if dtype in (torch.float32, torch.float64) else 1) * ulp(dtype) * ref.abs().max().clamp_min(1)
        assert err_ours <= err_theirs + slack, (what, err_ours.item(), err_theirs.item())


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


class ResidualBlock(torch.nn.Module):
    """x + relu(fc(x)) through a norm module, as in transformer layers."""

    def __init__(self, d, norm):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)
        self.norm = norm

    def forward(self, x):
        return self.norm(x + torch.relu(self.fc(x)))


def assert_compiled_block_matches_eager(norm, device, dynamic):
    """torch.compile(fullgraph=True) of a ResidualBlock around `norm` gives eager's output
    and parameter gradients, for two row counts (a recompile, or one dynamic graph).
    Returns the eager block."""
    model = ResidualBlock(norm.normalized_shape[-1], norm).to(device)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, dynamic=dynamic)
    for rows in (5, 9):
        x = torch.randn(2, rows, model.fc.in_features, device=device)
        outs = []
        for m in (model, compiled):
            m.zero_grad()
            y = m(x)
            y.square().sum().backward()
            outs.append([y.detach()] + [p.grad for p in m.parameters()])
        for a, c in zip(*outs):
            torch.testing.assert_close(a, c)
    return model
