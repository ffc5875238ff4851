"""fused_norm.layer_norm / FusedLayerNorm against torch.nn.functional.layer_norm / nn.LayerNorm."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_norm
from conftest import (CUDA_OK, DTYPE_IDS, DTYPES, assert_close_to_reference, assert_compiled_block_matches_eager,
                      assert_gradients_of_every_subset, cpu_capabilities)

ops = torch.ops.fused_norm

# (input shape, normalized_shape)
SHAPES = [
    pytest.param((0, 8), (8,), marks=pytest.mark.no_kernels),
    ((5, 1), (1,)),
    ((7, 3), (3,)),
    ((9, 127), (127,)),
    ((3, 5, 769), (769,)),
    ((2, 5000), (5000,)),
    ((3, 65537), (65537,)),
    ((2, 3, 4, 5), (4, 5)),
    ((4, 2, 3, 7), (2, 3, 7)),
]


def _inputs(shape, norm_shape, dtype, wdtype, device, affine=(True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5)
    w = torch.randn(norm_shape, generator=g, dtype=torch.float64) if affine[0] else None
    b = torch.randn(norm_shape, generator=g, dtype=torch.float64) if affine[1] else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return cast(x, dtype), cast(w, wdtype), cast(b, wdtype), cast(dy, dtype)


def _run(fn, x, norm_shape, w, b, dy, eps=1e-5):
    """Forward and the three gradients of fn (ours or torch's)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], norm_shape, leaves[1], leaves[2], eps)
    y.backward(dy)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def _check_against_torch(x, norm_shape, w, b, dy, dtype, eps=1e-5):
    ours = _run(fused_norm.layer_norm, x, norm_shape, w, b, dy, eps)
    theirs = _run(F.layer_norm, x, norm_shape, w, b, dy, eps)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _run(F.layer_norm, d64(x), norm_shape, d64(w), d64(b), d64(dy), eps)
    for name, o, t, r in zip(("y", "dx", "dweight", "dbias"), ours, theirs, ref):
        if r is None:
            assert o is None
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, (name, o.dtype, t.dtype, o.shape, t.shape)
        assert_close_to_reference(o, t, r, o.dtype if name in ("y", "dx") else dtype, name)
    return ours


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,norm_shape", SHAPES, ids=[str(getattr(s, "values", s)[0]) for s in SHAPES])
def test_matches_torch(device, shape, norm_shape, dtype, wdtype):
    x, w, b, dy = _inputs(shape, norm_shape, dtype, wdtype, device)
    _check_against_torch(x, norm_shape, w, b, dy, dtype)


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)], ids=["w", "b", "none"])
@pytest.mark.parametrize("dtype,wdtype", DTYPES[:3] + DTYPES[4:5], ids=DTYPE_IDS[:3] + DTYPE_IDS[4:5])
def test_partial_affine(device, affine, dtype, wdtype):
    x, w, b, dy = _inputs((6, 300), (300,), dtype, wdtype, device, affine=affine)
    if w is None and b is not None and b.dtype != x.dtype:
        # torch rejects a float32 bias without weight for bf16 input ("expected scalar type
        # BFloat16 but found Float"), which is a valid mixed-precision setup: we accept it.
        ours = _run(fused_norm.layer_norm, x, (300,), w, b, dy)
        ref = _run(F.layer_norm, x.double(), (300,), None, b.double(), dy.double())
        for o, r in zip(ours, ref):
            if r is not None:
                torch.testing.assert_close(o.double(), r, atol=2e-2, rtol=2e-2)
        return
    _check_against_torch(x, (300,), w, b, dy, dtype)


@pytest.mark.parametrize("cpu_capability", cpu_capabilities(), indirect=True)
@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cols", [1, 15, 33, 2048, 4099])
def test_every_cpu_isa(cpu_capability, cols, dtype, wdtype):
    x, w, b, dy = _inputs((11, cols), (cols,), dtype, wdtype, "cpu", seed=cols)
    _check_against_torch(x, (cols,), w, b, dy, dtype)


def test_huge_width(device):
    x, w, b, dy = _inputs((2, 262144), (262144,), torch.float32, torch.float32, device)
    _check_against_torch(x, (262144,), w, b, dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "col_slice", "expanded", "unaligned", "permuted"])
def test_non_contiguous(device, layout, dtype):
    base = torch.randn(40, 130, dtype=torch.float64, device=device).to(dtype)
    if layout == "transposed":
        x = base[:, :40].t()  # rows are strided columns
    elif layout == "row_slice":
        x = base[:, 3:103]  # row stride 130, not a multiple of 8
    elif layout == "col_slice":
        x = base[::3, :]  # every third row
    elif layout == "expanded":
        x = base[0].expand(5, 130)  # row stride 0
    elif layout == "unaligned":
        x = base.flatten()[1:1 + 39 * 129].view(39, 129)  # data pointer off 16-byte alignment
    else:
        x = base[:, :120].reshape(40, 4, 30).permute(1, 0, 2)  # leading dims do not collapse
    n = x.shape[-1]
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    dy = torch.randn(x.shape[::-1], device=device, dtype=dtype).transpose(0, -1)  # non-contiguous too
    _check_against_torch(x, (n,), w, b, dy, dtype)


def test_nan_inf_stay_in_their_row(device):
    x = torch.randn(6, 64, device=device)
    x[1, 5] = float("nan")
    x[3, 0] = float("inf")
    y = fused_norm.layer_norm(x, (64,))
    ref = F.layer_norm(x, (64,))
    assert y[[1, 3]].isnan().all()
    clean = [0, 2, 4, 5]
    torch.testing.assert_close(y[clean], ref[clean])


def test_eps(device):
    x = torch.randn(4, 32, device=device) * 1e-3
    torch.testing.assert_close(fused_norm.layer_norm(x, (32,), eps=1e-2), F.layer_norm(x, (32,), eps=1e-2))


def test_size_normalized_shape_and_int_refused(device):
    x = torch.randn(3, 4, 10, device=device)
    torch.testing.assert_close(fused_norm.layer_norm(x, torch.Size([4, 10])), F.layer_norm(x, (4, 10)))
    torch.testing.assert_close(fused_norm.layer_norm(x, [10]), F.layer_norm(x, [10]))
    for fn in (F.layer_norm, fused_norm.layer_norm):  # a bare int is not a shape
        with pytest.raises(TypeError, match=r"layer_norm\(\): argument 'normalized_shape' \(position 2\) must be "
                                            "tuple of ints, not int"):
            fn(x, 10)


def test_gradcheck(device):
    x = torch.randn(5, 2, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, 7, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: fused_norm.layer_norm(x, (2, 7), w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: fused_norm.layer_norm(x, (7,)), (x,))
    assert torch.autograd.gradgradcheck(lambda x, w, b: fused_norm.layer_norm(x, (2, 7), w, b), (x, w, b))


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["wb", "w", "b", "none"])
def test_gradients_of_any_subset(device, affine):
    x, w, b, dy = _inputs((6, 2, 9), (2, 9), torch.float64, torch.float64, device, affine=affine)
    assert_gradients_of_every_subset(fused_norm.layer_norm, F.layer_norm,
                                     lambda fn, x, w, b: fn(x, (2, 9), w, b, 1e-5), x, w, b, dy)


@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[4]], ids=["fp32", "bf16+fp32w"])
@pytest.mark.parametrize("affine", [(True, True), (False, True), (False, False)], ids=["wb", "b", "none"])
def test_opcheck(device, affine, dtype, wdtype):
    x, w, b, dy = _inputs((3, 4, 40), (4, 40), dtype, wdtype, device, affine=affine)
    x.requires_grad_()
    for t in (w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(ops.layer_norm_fwd, (x, [4, 40], w, b, 1e-5))
    _, mean, rstd = ops.layer_norm_fwd(x, [4, 40], w, b, 1e-5)
    torch.library.opcheck(ops.layer_norm_bwd, (dy, x.detach(), [4, 40], mean, rstd, w, b))


@pytest.mark.parametrize("shape", [(3000, 96), (257, 1), (301, 1031), (64, 5000), (9, 70000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_deterministic(device, shape):
    """Two runs give the same bits, at widths taking each kernel tier (one row-group
    reduction or many; rows within one block or over several)."""
    x, w, b, dy = _inputs(shape, shape[-1:], torch.float32, torch.float32, device)
    first = _run(fused_norm.layer_norm, x, shape[-1:], w, b, dy)
    second = _run(fused_norm.layer_norm, x, shape[-1:], w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
def test_statistics_dtype(device, dtype, wdtype):
    """mean and rstd are float32 (float64 for float64 input), whatever the input and
    parameter dtypes; the output has the input's dtype."""
    x, w, b, _ = _inputs((4, 33), (33,), dtype, wdtype, device)
    y, mean, rstd = ops.layer_norm_fwd(x, [33], w, b, 1e-5)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == stat and rstd.dtype == stat
    assert mean.shape == rstd.shape == (4, 1)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_matches_eager(device, dynamic):
    torch.manual_seed(0)
    assert_compiled_block_matches_eager(fused_norm.FusedLayerNorm(48), device, dynamic)


def test_module_is_a_layernorm_and_checkpoints_both_ways():
    ours = fused_norm.FusedLayerNorm((3, 8), eps=1e-6)
    theirs = nn.LayerNorm((3, 8), eps=1e-6)
    assert isinstance(ours, nn.LayerNorm)
    assert repr(ours) == repr(theirs).replace("LayerNorm", "FusedLayerNorm")
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    back = nn.LayerNorm((3, 8), eps=1e-6)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), theirs(x))
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3, 8)) and torch.equal(ours.bias, torch.zeros(3, 8))


@pytest.mark.parametrize("kwargs", [dict(bias=False), dict(elementwise_affine=False), dict(dtype=torch.float64)])
def test_module_options(device, kwargs):
    ours = fused_norm.FusedLayerNorm(16, device=device, **kwargs)
    theirs = nn.LayerNorm(16, device=device, **kwargs)
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in theirs.state_dict().items()]
    x = torch.randn(3, 16, device=device, dtype=kwargs.get("dtype", torch.float32))
    torch.testing.assert_close(ours(x), theirs(x))


def test_autocast_matches_torch(device):
    amp = torch.bfloat16
    x = torch.randn(4, 32, device=device)
    for inp in (x, x.to(amp)):
        ours, theirs = fused_norm.FusedLayerNorm(32).to(device), nn.LayerNorm(32).to(device)
        with torch.autocast(device, dtype=amp):
            y_ours, y_theirs = ours(inp), theirs(inp)
        assert y_ours.dtype == y_theirs.dtype
        torch.testing.assert_close(y_ours, y_theirs)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (((4, 8), (7,), None, None), RuntimeError, r"Given normalized_shape=\[7\], expected input with shape \[\*, 7\]"),
        (((8,), (2, 8), None, None), RuntimeError, r"expected input with shape \[\*, 2, 8\]"),
        (((4, 8), (), None, None), RuntimeError, "at least 1-dimensional"),
        (((4, 8), (8,), (7,), None), RuntimeError, "Expected weight to be of same shape as normalized_shape"),
        (((4, 8), (8,), None, (1, 8)), RuntimeError, "Expected bias to be of same shape as normalized_shape"),
    ],
)
@pytest.mark.no_kernels
def test_bad_shapes(device, args, exc, match):
    xs, ns, ws, bs = args
    mk = lambda s: None if s is None else torch.ones(s, device=device)  # noqa: E731
    with pytest.raises(exc, match=match):
        fused_norm.layer_norm(mk(xs), ns, mk(ws), mk(bs))
    with pytest.raises(exc, match=match):
        F.layer_norm(mk(xs), ns, mk(ws), mk(bs))


@pytest.mark.parametrize(
    "xdt,wdt,bdt",
    [
        (torch.float32, torch.float64, None),
        (torch.float32, torch.bfloat16, None),
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16, None),
    ],
)
def test_bad_dtypes_like_torch(xdt, wdt, bdt):
    x = torch.randn(2, 8, dtype=xdt)
    w = torch.ones(8, dtype=wdt)
    b = None if bdt is None else torch.zeros(8, dtype=bdt)
    with pytest.raises(RuntimeError) as theirs:
        F.layer_norm(x, (8,), w, b)
    with pytest.raises(RuntimeError) as ours:
        fused_norm.layer_norm(x, (8,), w, b)
    assert str(ours.value).splitlines()[0] == str(theirs.value).splitlines()[0]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
def test_unsupported_input_dtype(dtype):
    x = torch.ones(2, 8, dtype=dtype)
    with pytest.raises(NotImplementedError, match="not implemented for"):
        fused_norm.layer_norm(x, (8,))


@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_weight_on_other_device():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        fused_norm.layer_norm(x, (8,), torch.ones(8))


@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_runs_on_current_stream_and_device():
    x, w, b, dy = _inputs((64, 1000), (1000,), torch.float32, torch.float32, "cuda")
    expected = _run(fused_norm.layer_norm, x, (1000,), w, b, dy)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = _run(fused_norm.layer_norm, x, (1000,), w, b, dy)
    stream.synchronize()
    for a, c in zip(expected, got):
        assert torch.equal(a, c)


@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
@pytest.mark.skipif(CUDA_OK and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30, reason="needs 40 GiB")
def test_more_than_2_pow_31_elements():
    rows, cols = 2**21 + 3, 1024  # 2^31 + 3072 elements in bf16
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xg = x.requires_grad_()
    y = fused_norm.layer_norm(xg, (cols,), w)
    tail = slice(rows - 5, rows)
    torch.testing.assert_close(y[tail], F.layer_norm(x[tail].detach(), (cols,), w.detach()))
    y.backward(torch.ones_like(y))
    assert torch.isfinite(xg.grad[tail]).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("cols", [64, 2048, 20000], ids=["warp", "block", "stream"])
def test_constant_rows_of_large_magnitude(device, cols):
    """Rows whose mean is beyond sqrt(float max) and whose variance is 0: y = 0 and rstd =
    1/sqrt(eps), as float64 gives (torch's float32 CPU kernel gives NaN here). Merging a
    part into empty moments computed delta^2 * 0 = inf * 0 = NaN (the CUDA streaming tier's
    first vector). Powers of two, so that every sum of them is exact in float32."""
    x = torch.full((3, cols), 2.0**66, device=device)
    x[1] = -(2.0**65)
    y, mean, rstd = torch.ops.fused_norm.layer_norm_fwd(x, [cols], None, None, 1e-5)
    refs = torch.ops.aten.native_layer_norm(x.double(), [cols], None, None, 1e-5)
    for name, ours, ref in zip(("y", "mean", "rstd"), (y, mean, rstd), refs):
        torch.testing.assert_close(ours, ref.float(), msg=name)
