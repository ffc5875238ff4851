"""fused_norm.rms_norm / FusedRMSNorm and the rms_norm_fwd/bwd ops against
torch.nn.functional.rms_norm / nn.RMSNorm (and float64 references)."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_norm
from conftest import (DTYPE_IDS, DTYPES, assert_accurate, assert_compiled_block_matches_eager, count_fused_calls,
                      cpu_capabilities, raises_like_torch)

ops = torch.ops.fused_norm

# (input shape, normalized_shape): one column, odd widths, each CUDA tier (warp groups of
# 1-32 lanes, block per row, streaming), multi-dim normalized shapes.
SHAPES = [
    ((5, 1), (1,)),
    ((7, 3), (3,)),
    ((300, 64), (64,)),
    ((9, 127), (127,)),
    ((3, 5, 769), (769,)),
    ((2, 5000), (5000,)),
    ((2, 40000), (40000,)),
    ((2, 3, 4, 5), (4, 5)),
]


def _inputs(shape, norm_shape, dtype, wdtype, device, weight=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(norm_shape, generator=g, dtype=torch.float64) if weight else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return cast(x, dtype), cast(w, wdtype), cast(dy, dtype)


def _run(fn, x, norm_shape, w, dy, eps=None):
    """Forward and the gradients of fn (ours or torch's)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w)]
    y = fn(leaves[0], norm_shape, leaves[1], eps)
    y.backward(dy)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _check_against_torch(x, norm_shape, w, dy, eps=None):
    with count_fused_calls() as count:
        ours = _run(fused_norm.rms_norm, x, norm_shape, w, dy, eps)
    assert count.n >= 2  # forward and backward ops
    theirs = _run(F.rms_norm, x, norm_shape, w, dy, eps)
    if eps is None:  # the reference in float64 with the working dtype's eps
        eps = torch.finfo(x.dtype).eps
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _run(F.rms_norm, d64(x), norm_shape, d64(w), d64(dy), eps)
    for name, o, t, r in zip(("y", "dx", "dweight"), ours, theirs, ref):
        if r is None:
            assert o is None
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, (name, o.dtype, t.dtype, o.shape, t.shape)
        assert_accurate(o, t, r, o.dtype, name)
    return ours


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,norm_shape", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_matches_torch(device, shape, norm_shape, dtype, wdtype):
    x, w, dy = _inputs(shape, norm_shape, dtype, wdtype, device)
    _check_against_torch(x, norm_shape, w, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_weight_and_eps(device, dtype):
    x, _, dy = _inputs((6, 300), (300,), dtype, dtype, device, weight=False)
    _check_against_torch(x, (300,), None, dy)
    _check_against_torch(x * 1e-3, (300,), None, dy, eps=1e-2)


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                     (torch.float16, torch.bfloat16), (torch.float64, torch.float32)])
def test_other_weight_dtypes_like_torch(device, xdt, wdt):
    """torch takes any floating weight and returns the input's dtype."""
    x, w, dy = _inputs((4, 40), (40,), xdt, wdt, device)
    _check_against_torch(x, (40,), w, dy)


@pytest.mark.no_kernels
def test_empty(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    y = fused_norm.rms_norm(x, (8,), w)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(8))


@pytest.mark.parametrize("cpu_capability", cpu_capabilities(), indirect=True)
@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cols", [1, 33, 4099])
def test_every_cpu_isa(cpu_capability, cols, dtype, wdtype):
    x, w, dy = _inputs((11, cols), (cols,), dtype, wdtype, "cpu", seed=cols)
    _check_against_torch(x, (cols,), w, dy)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "expanded", "unaligned", "permuted"])
def test_non_contiguous(device, layout):
    base = torch.randn(40, 130, device=device).bfloat16()
    if layout == "transposed":
        x = base[:, :40].t()
    elif layout == "row_slice":
        x = base[:, 3:103]
    elif layout == "expanded":
        x = base[0].expand(5, 130)
    elif layout == "unaligned":
        x = base.flatten()[1:1 + 39 * 129].view(39, 129)
    else:
        x = base[:, :120].reshape(40, 4, 30).permute(1, 0, 2)
    n = x.shape[-1]
    w = torch.randn(n, device=device, dtype=torch.bfloat16)
    dy = torch.randn(x.shape[::-1], device=device, dtype=torch.bfloat16).transpose(0, -1)
    _check_against_torch(x, (n,), w, dy)


@pytest.mark.parametrize("shape", [(3000, 64), (301, 1031), (9, 70000)], ids=lambda s: "x".join(map(str, s)))
def test_deterministic(device, shape):
    x, w, dy = _inputs(shape, shape[-1:], torch.float32, torch.float32, device)
    first = _run(fused_norm.rms_norm, x, shape[-1:], w, dy)
    second = _run(fused_norm.rms_norm, x, shape[-1:], w, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def _hf_reference(x, w, eps, offset, round_xhat):
    """The Hugging Face families' forwards: Llama (round_xhat: x_hat rounded to x's dtype,
    then times the weight in its dtype) and Gemma (x_hat * (offset + w) in float32, then
    rounded)."""
    xf = x.float() if x.dtype != torch.float64 else x
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if round_xhat:
        return w * xhat.to(x.dtype)
    return (xhat * (offset + w.to(xf.dtype))).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cols", [64, 1000, 40000], ids=["warp", "block", "stream"])
@pytest.mark.parametrize("mode", ["gemma", "llama"])
def test_weight_offset_and_rounding_point(device, mode, cols, dtype):
    """The op's options give the Hugging Face families' own results (to an ulp of the
    output: the mean square sums in another order), and their gradients those of the
    float64 function."""
    x, w, dy = _inputs((5, cols), (cols,), dtype, dtype, device)
    offset, round_xhat = (1.0, False) if mode == "gemma" else (0.0, True)
    y, rstd = ops.rms_norm_fwd(x, [cols], w, 1e-6, offset, round_xhat)
    expected = _hf_reference(x, w, 1e-6, offset, round_xhat)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, atol=2 * torch.finfo(dtype).eps * 4, rtol=2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(rstd, x.double().pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt().float())
    dx, dw = ops.rms_norm_bwd(dy, x, [cols], rstd, w, offset)
    leaves = [x.double().requires_grad_(), w.double().requires_grad_()]
    ref = _hf_reference(*leaves, 1e-6, offset, False)
    ref.backward(dy.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dx.double(), leaves[0].grad, **tol)
    torch.testing.assert_close(dw.double(), leaves[1].grad, **{k: v * cols ** 0.5 for k, v in tol.items()})


def test_gradcheck(device):
    x = torch.randn(5, 2, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused_norm.rms_norm(x, (2, 7), w, 1e-5), (x, w),
                                    check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda x: fused_norm.rms_norm(x, (7,)), (x,))
    assert torch.autograd.gradgradcheck(lambda x, w: fused_norm.rms_norm(x, (2, 7), w), (x, w),
                                        check_fwd_over_rev=True)
    gemma = lambda x, w: ops.rms_norm_fwd(x, [7], w, 1e-6, 1.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(gemma, (x, w[0]), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(gemma, (x, w[0]))


def test_gradients_of_any_subset(device):
    x, w, dy = _inputs((6, 2, 9), (2, 9), torch.float64, torch.float64, device)
    for wx, ww in ((True, True), (True, False), (False, True)):
        leaves = [x.clone().requires_grad_(wx), w.clone().requires_grad_(ww)]
        y = fused_norm.rms_norm(leaves[0], (2, 9), leaves[1])
        wanted = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad(y, wanted, dy)
        ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        exp = torch.autograd.grad(F.rms_norm(ref[0], (2, 9), ref[1]), [t for t in ref if t.requires_grad], dy)
        for a, b in zip(got, exp, strict=True):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert not fused_norm.rms_norm(x.requires_grad_(), (2, 9), w).requires_grad


def test_vmap_and_forward_ad(device):
    x = torch.randn(3, 4, 16, dtype=torch.float64, device=device)
    w = torch.randn(3, 16, dtype=torch.float64, device=device)
    ours = torch.func.vmap(lambda x, w: fused_norm.rms_norm(x, (16,), w))(x, w)
    theirs = torch.func.vmap(lambda x, w: F.rms_norm(x, (16,), w))(x, w)
    torch.testing.assert_close(ours, theirs)
    # per-sample gradients with a mapped weight
    loss = lambda fn: lambda w, x: fn(x, (16,), w).sin().sum()  # noqa: E731
    g_ours = torch.func.vmap(torch.func.grad(loss(fused_norm.rms_norm)))(w, x)
    g_theirs = torch.func.vmap(torch.func.grad(loss(F.rms_norm)))(w, x)
    torch.testing.assert_close(g_ours, g_theirs)
    t = torch.randn_like(x)
    _, jvp_ours = torch.func.jvp(lambda x: fused_norm.rms_norm(x, (16,), w[0]), (x,), (t,))
    _, jvp_theirs = torch.func.jvp(lambda x: F.rms_norm(x, (16,), w[0]), (x,), (t,))
    torch.testing.assert_close(jvp_ours, jvp_theirs)


@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[4]], ids=["fp32", "bf16+fp32w"])
@pytest.mark.parametrize("offset,round_xhat", [(0.0, False), (1.0, False), (0.0, True)],
                         ids=["torch", "gemma", "llama"])
def test_opcheck(device, dtype, wdtype, offset, round_xhat):
    x, w, dy = _inputs((3, 4, 40), (4, 40), dtype, wdtype, device)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(ops.rms_norm_fwd, (x, [4, 40], w, 1e-5, offset, round_xhat))
    torch.library.opcheck(ops.rms_norm_fwd, (x, [40], None, 1e-5))
    # a dense permuted input: y keeps its strides (as torch's), in the fake kernel too
    torch.library.opcheck(ops.rms_norm_fwd, (x.transpose(0, 1), [40], w[0], 1e-5))
    torch.library.opcheck(ops.rms_norm_fwd, (x.transpose(1, 2), [4], None, 1e-5))
    _, rstd = ops.rms_norm_fwd(x, [4, 40], w, 1e-5, offset, round_xhat)
    torch.library.opcheck(ops.rms_norm_bwd, (dy, x.detach(), [4, 40], rstd, w, offset))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_matches_eager(device, dynamic):
    model = assert_compiled_block_matches_eager(fused_norm.FusedRMSNorm(48), device, dynamic)
    graph = torch._dynamo.explain(model)(torch.randn(2, 5, 48, device=device)).graphs[0]
    assert "torch.ops.fused_norm.rms_norm_fwd" in graph.code


def test_module_is_an_rmsnorm_and_checkpoints_both_ways():
    ours = fused_norm.FusedRMSNorm((3, 8), eps=1e-6)
    theirs = nn.RMSNorm((3, 8), eps=1e-6)
    assert isinstance(ours, nn.RMSNorm)
    assert repr(ours) == repr(theirs).replace("RMSNorm", "FusedRMSNorm")
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 8)
    with count_fused_calls() as count:
        torch.testing.assert_close(ours(x), theirs(x))
    assert count.n == 1
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3, 8))


@pytest.mark.parametrize("kwargs", [dict(elementwise_affine=False), dict(dtype=torch.float64), dict(eps=None),
                                    dict(eps=1e-3, dtype=torch.bfloat16)])
def test_module_options(device, kwargs):
    ours = fused_norm.FusedRMSNorm(16, device=device, **kwargs)
    theirs = nn.RMSNorm(16, device=device, **kwargs)
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in theirs.state_dict().items()]
    x = torch.randn(3, 16, device=device, dtype=kwargs.get("dtype", torch.float32))
    torch.testing.assert_close(ours(x), theirs(x))


def test_convert_model_converts_rmsnorm():
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Sequential(nn.RMSNorm([2, 4], eps=1e-3)))
    weight = model[1].weight
    assert fused_norm.convert_model(model) is model
    assert type(model[1]) is fused_norm.FusedRMSNorm and type(model[2][0]) is fused_norm.FusedRMSNorm
    assert model[1].weight is weight


def test_scripted_module():
    m = fused_norm.FusedRMSNorm(16)
    scripted = torch.jit.script(m)
    x = torch.randn(3, 16)
    with count_fused_calls() as count:
        torch.testing.assert_close(scripted(x), nn.RMSNorm(16)(x))
    assert count.n == 1


@pytest.mark.no_kernels
@pytest.mark.parametrize("args", [((4, 8), (7,), None), ((8,), (2, 8), None), ((4, 8), (), None),
                                  ((4, 8), (8,), (7,))], ids=["shape", "rank", "empty_shape", "weight"])
def test_bad_shapes_like_torch(device, args):
    xs, ns, ws = args
    mk = lambda s: None if s is None else torch.ones(s, device=device)  # noqa: E731
    raises_like_torch(lambda: fused_norm.rms_norm(mk(xs), ns, mk(ws)), lambda: F.rms_norm(mk(xs), ns, mk(ws)))


@pytest.mark.no_kernels
def test_bad_arguments_like_torch():
    x = torch.randn(3, 8)
    for args in ((x, 8), (x, (8,), "w"), (x, (8,), None, "eps"), ("x", (8,))):
        raises_like_torch(lambda: fused_norm.rms_norm(*args), lambda: F.rms_norm(*args))
    xi = torch.ones(2, 8, dtype=torch.int32)
    raises_like_torch(lambda: fused_norm.rms_norm(xi, (8,), None, 1e-5), lambda: F.rms_norm(xi, (8,), None, 1e-5))
