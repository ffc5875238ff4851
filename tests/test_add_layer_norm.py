"""fused_norm.add_layer_norm / add_layer_norm_post (and their modules) against torch's
unfused composition: the sum `input + residual`, then F.layer_norm."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_norm
from conftest import assert_close_to_reference, count_fused_calls, cpu_capabilities

ops = torch.ops.fused_norm

# (input dtype, residual dtype, residual_in_fp32, parameter dtype)
CASES = [
    (torch.float32, torch.float32, False, torch.float32),
    (torch.float64, torch.float64, False, torch.float64),
    (torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    (torch.float16, torch.float16, False, torch.float16),
    (torch.bfloat16, torch.bfloat16, False, torch.float32),
    (torch.bfloat16, torch.bfloat16, True, torch.bfloat16),
    (torch.bfloat16, torch.float32, False, torch.float32),
    (torch.float16, torch.float32, True, torch.float32),
]
CASE_IDS = ["fp32", "fp64", "bf16", "fp16", "bf16+fp32w", "bf16-res32", "bf16+fp32res", "fp16+fp32res-res32"]

# (the empty input launches no kernel: its emulated run is not required to)
SHAPES = [pytest.param((0, 8), (8,), marks=pytest.mark.no_kernels, id="(0, 8)")] + [
    pytest.param(shape, norm_shape, id=str(shape))
    for shape, norm_shape in [((5, 1), (1,)), ((9, 127), (127,)), ((3, 5, 769), (769,)), ((2, 5000), (5000,)),
                              ((2, 3, 4, 5), (4, 5))]]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, norm_shape, dtype, rdtype, wdtype, seed=0, affine=(True, True), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r64 = lambda s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    x, r = r64(shape) * 2 + 0.5, r64(shape)
    w = r64(norm_shape) if affine[0] else None
    b = r64(norm_shape) if affine[1] else None
    dy, ds = r64(shape).to(device), r64(shape).to(device)
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return cast(x, dtype), cast(r, rdtype), cast(w, wdtype), cast(b, wdtype), dy, ds


def _unfused(x, r, norm_shape, w, b, eps, residual_in_fp32, round_to=None):
    """torch's composition: the sum in its dtype (promoted; float32 when asked), the norm
    of it, the output in input's dtype. round_to: the sum rounded to that dtype first (the
    float64 reference of the norm of a stored sum)."""
    s = x + r
    if residual_in_fp32:
        s = s.float()
    if round_to is not None:
        s = s.to(round_to).to(s.dtype)
    p = lambda t: None if t is None else t.to(s.dtype)  # noqa: E731  (F.layer_norm wants s's dtype)
    return F.layer_norm(s, norm_shape, p(w), p(b), eps).to(x.dtype), s


def _run(fn, x, r, norm_shape, w, b, dy, ds, pre, eps=1e-5, *args):
    """Outputs and the gradients of input, residual, weight, bias; ds is the sum's
    gradient (pre-norm)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    y, s = fn(*leaves[:2], norm_shape, *leaves[2:], eps, *args)
    loss = (y.double() * dy).sum() + ((s.double() * ds).sum() if pre else 0)
    loss.backward()
    return [y.detach(), s.detach() if pre else None] + [t.grad if t is not None else None for t in leaves]


def _ours(pre):
    def fn(x, r, ns, w, b, eps, fp32):
        if pre:
            return fused_norm.add_layer_norm(x, r, ns, w, b, eps, residual_in_fp32=fp32)
        return fused_norm.add_layer_norm_post(x, r, ns, w, b, eps, residual_in_fp32=fp32), None
    return fn


def _check(x, r, norm_shape, w, b, dy, ds, pre, residual_in_fp32=False, eps=1e-5):
    sum_dtype = torch.float32 if residual_in_fp32 else r.dtype
    dy, ds = dy.to(x.dtype).double(), ds.to(sum_dtype).double()  # the gradients as they arrive
    with count_fused_calls() as calls:
        ours = _run(_ours(pre), x, r, norm_shape, w, b, dy, ds, pre, eps, residual_in_fp32)
    assert calls.n == 2  # the forward and the backward
    theirs = _run(_unfused, x, r, norm_shape, w, b, dy, ds, pre, eps, residual_in_fp32)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _run(_unfused, d64(x), d64(r), norm_shape, d64(w), d64(b), dy, ds, pre, eps, False, sum_dtype)
    for name, o, t, rf, dtype in zip(("y", "new_residual", "dx", "dresidual", "dweight", "dbias"), ours, theirs, ref,
                                     (x.dtype, sum_dtype, x.dtype, r.dtype, None, None)):
        if rf is None or o is None:
            assert o is None and (t is None or not pre), name
            continue
        if dtype is None:
            dtype = o.dtype
        assert o.dtype == dtype and o.shape == rf.shape, (name, o.dtype, dtype, o.shape)
        assert_close_to_reference(o, t.to(dtype), rf, o.dtype if name != "dweight" else x.dtype, name)
    return ours


@pytest.mark.parametrize("pre", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("dtype,rdtype,fp32,wdtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
def test_matches_unfused(device, shape, norm_shape, dtype, rdtype, fp32, wdtype, pre):
    x, r, w, b, dy, ds = _inputs(shape, norm_shape, dtype, rdtype, wdtype, device=device)
    _check(x, r, norm_shape, w, b, dy, ds, pre, fp32)


@pytest.mark.parametrize("cpu_capability", cpu_capabilities(), indirect=True)
@pytest.mark.parametrize("dtype,rdtype,fp32,wdtype", [CASES[i] for i in (0, 1, 2, 3, 6)],
                         ids=[CASE_IDS[i] for i in (0, 1, 2, 3, 6)])
@pytest.mark.parametrize("cols", [15, 2048, 4099])
def test_every_cpu_isa(cpu_capability, cols, dtype, rdtype, fp32, wdtype):
    x, r, w, b, dy, ds = _inputs((5, cols), (cols,), dtype, rdtype, wdtype, seed=cols)
    for pre in (True, False):
        _check(x, r, (cols,), w, b, dy, ds, pre, fp32)


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)], ids=["w", "b", "none"])
def test_partial_affine(device, affine):
    x, r, w, b, dy, ds = _inputs((6, 300), (300,), torch.float32, torch.float32, torch.float32, affine=affine,
                                 device=device)
    for pre in (True, False):
        _check(x, r, (300,), w, b, dy, ds, pre)


@pytest.mark.parametrize("layout", ["transposed", "row_slice", "expanded", "unaligned"])
def test_non_contiguous(device, layout):
    base = torch.randn(2, 40, 130, dtype=torch.float64).to(device=device, dtype=torch.bfloat16)
    if layout == "transposed":
        x, r = base[0, :, :40].t(), base[1, :, :40].t()
    elif layout == "row_slice":
        x, r = base[0, :, 3:103], base[1, :, 5:105]
    elif layout == "expanded":
        x, r = base[0, 0].expand(5, 130), base[1, :5]
    else:
        x, r = (base.flatten()[k:k + 39 * 129].view(39, 129) for k in (1, 5003))
    n = x.shape[-1]
    w, b = torch.randn(n, device=device), torch.randn(n, device=device)
    dy, ds = (torch.randn(x.shape[::-1], dtype=torch.float64, device=device).t() for _ in range(2))
    for pre in (True, False):
        _check(x, r, (n,), w, b, dy, ds, pre)


def test_only_one_output_used():
    """Gradients reach input and residual through either output alone (the other's
    gradient is None in the backward)."""
    x, r, w, b, _, _ = _inputs((4, 33), (33,), torch.float64, torch.float64, torch.float64)
    for pick in (0, 1):
        grads = []
        for fn in (_ours(True), _unfused):
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            out = fn(leaves[0], leaves[1], (33,), leaves[2], leaves[3], 1e-5, False)[pick]
            grads.append(torch.autograd.grad(out.sin().sum(), leaves, allow_unused=True))
        for a, c in zip(*grads):
            if c is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, c)


def test_functional_no_aliasing_no_inplace():
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    x0, r0 = x.clone(), r.clone()
    y, s = fused_norm.add_layer_norm(x, r, (16,))
    assert torch.equal(x, x0) and torch.equal(r, r0)
    ptrs = {t.untyped_storage().data_ptr() for t in (x, r, y, s)}
    assert len(ptrs) == 4


def test_gradcheck_and_double_backward():
    x, r = (torch.randn(5, 2, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(2, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pre = lambda *a: fused_norm.add_layer_norm(a[0], a[1], (2, 7), a[2], a[3])  # noqa: E731
    post = lambda *a: fused_norm.add_layer_norm_post(a[0], a[1], (2, 7), a[2], a[3])  # noqa: E731
    for fn in (pre, post):
        assert torch.autograd.gradcheck(fn, (x, r, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("store_sum", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("dtype,rdtype,fp32,wdtype", [CASES[i] for i in (0, 5, 6)],
                         ids=[CASE_IDS[i] for i in (0, 5, 6)])
def test_opcheck(device, dtype, rdtype, fp32, wdtype, store_sum):
    x, r, w, b, dy, ds = _inputs((3, 4, 40), (4, 40), dtype, rdtype, wdtype, device=device)
    args = [t.requires_grad_() for t in (x, r, w, b)]
    torch.library.opcheck(ops.add_layer_norm_fwd, (args[0], args[1], [4, 40], args[2], args[3], 1e-5, fp32,
                                                   store_sum))
    with torch.no_grad():
        _, s, mean, rstd = ops.add_layer_norm_fwd(x, r, [4, 40], w, b, 1e-5, fp32, store_sum)
    sum_dtype = torch.float32 if fp32 else rdtype
    xs, res = (s, None) if store_sum else (x.detach(), r.detach())
    torch.library.opcheck(ops.add_layer_norm_bwd, (dy.to(dtype), ds.to(sum_dtype) if store_sum else None, xs, res,
                                                   [4, 40], mean, rstd, w.detach(), b.detach(), sum_dtype, rdtype))


def test_compile_fullgraph():
    block = nn.Linear(32, 32)
    norm = fused_norm.FusedAddLayerNorm(32)
    post = fused_norm.FusedPostAddLayerNorm(32)

    def fn(h, res):
        y, res = norm(block(h), res)
        return post(block(y), res)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    h, res = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    out, ref = compiled(h, res), fn(h, res)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.square().sum(), (h, res))
    g_ref = torch.autograd.grad(ref.square().sum(), (h, res))
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c)
    assert len(graphs) == 1 and graphs[0].count("torch.ops.fused_norm.add_layer_norm_fwd(") == 2


def test_compile_inductor():
    def fn(x, r, w, b):
        y, s = fused_norm.add_layer_norm(x, r, (64,), w, b)
        return y * 2, s + 1

    x, r = torch.randn(8, 64), torch.randn(8, 64)
    w, b = torch.randn(64), torch.randn(64)
    out = torch.compile(fn, fullgraph=True)(x, r, w, b)
    for a, c in zip(out, fn(x, r, w, b)):
        torch.testing.assert_close(a, c)


def test_errors_like_torch():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    cases = [
        (torch.randn(4, 9),
         "The size of tensor a (8) must match the size of tensor b (9) at non-singleton dimension 1"),
        (torch.randn(8), "residual must have input's shape"),
        (torch.randn(4, 8, dtype=torch.float64), "residual must have input's dtype"),
        (torch.randn(4, 8, device="meta"), "Expected all tensors to be on the same device"),
    ]
    for r, msg in cases:
        for fn in (fused_norm.add_layer_norm, fused_norm.add_layer_norm_post):
            with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                fn(x, r, (8,), w)
    with pytest.raises(RuntimeError, match=r"The size of tensor a \(8\) must match the size of tensor b \(9\)"):
        x + torch.randn(4, 9)  # torch's own message, the same
    with pytest.raises(RuntimeError, match="Given normalized_shape"):
        fused_norm.add_layer_norm(x, x, (7,))
    with pytest.raises(TypeError, match=r"add_layer_norm\(\): argument 'residual' \(position 2\) must be Tensor"):
        fused_norm.add_layer_norm(x, 1.0, (8,))
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        fused_norm.add_layer_norm(x.long(), x.long(), (8,))


def test_modules_are_layer_norms():
    for cls in (fused_norm.FusedAddLayerNorm, fused_norm.FusedPostAddLayerNorm):
        m = cls(16, eps=1e-6)
        plain = nn.LayerNorm(16, eps=1e-6)
        assert isinstance(m, nn.LayerNorm)
        assert m.state_dict().keys() == plain.state_dict().keys()
        with torch.no_grad():
            m.weight.uniform_()
            m.bias.uniform_()
        plain.load_state_dict(m.state_dict())
        x, r = torch.randn(3, 16), torch.randn(3, 16)
        out = m(x, r)
        if isinstance(out, tuple):
            torch.testing.assert_close(out[1], x + r)
            out = out[0]
        torch.testing.assert_close(out, plain(x + r))
    m = fused_norm.FusedAddLayerNorm(16, residual_in_fp32=True).to(torch.bfloat16)
    y, s = m(torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_empty():
    y, s = fused_norm.add_layer_norm(torch.randn(0, 8), torch.randn(0, 8), (8,))
    assert y.shape == s.shape == (0, 8)


# ---------------------------------------------------------------------------------------
# add_rms_norm: the same on the RMSNorm kernels, against F.rms_norm(input + residual).


def _rms_ours(pre):
    def fn(x, r, ns, w, b, eps, fp32):
        if pre:
            return fused_norm.add_rms_norm(x, r, ns, w, eps, residual_in_fp32=fp32)
        return fused_norm.add_rms_norm_post(x, r, ns, w, eps, residual_in_fp32=fp32), None
    return fn


def _rms_unfused(x, r, norm_shape, w, b, eps, residual_in_fp32, round_to=None):
    s = x + r
    if residual_in_fp32:
        s = s.float()
    if round_to is not None:
        s = s.to(round_to).to(s.dtype)
    return F.rms_norm(s, norm_shape, None if w is None else w.to(s.dtype), eps).to(x.dtype), s


@pytest.mark.parametrize("pre", [True, False], ids=["pre", "post"])
@pytest.mark.parametrize("dtype,rdtype,fp32,wdtype", [CASES[i] for i in (0, 1, 2, 4, 5, 6)],
                         ids=[CASE_IDS[i] for i in (0, 1, 2, 4, 5, 6)])
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
def test_add_rms_norm_matches_unfused(device, shape, norm_shape, dtype, rdtype, fp32, wdtype, pre):
    x, r, w, _, dy, ds = _inputs(shape, norm_shape, dtype, rdtype, wdtype, device=device)
    sum_dtype = torch.float32 if fp32 else rdtype
    dy, ds = dy.to(dtype).double(), ds.to(sum_dtype).double()
    with count_fused_calls() as calls:
        ours = _run(_rms_ours(pre), x, r, norm_shape, w, None, dy, ds, pre, 1e-6, fp32)
    assert calls.n == 2
    theirs = _run(_rms_unfused, x, r, norm_shape, w, None, dy, ds, pre, 1e-6, fp32)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _run(_rms_unfused, d64(x), d64(r), norm_shape, d64(w), None, dy, ds, pre, 1e-6, False, sum_dtype)
    for name, o, t, rf in zip(("y", "new_residual", "dx", "dresidual", "dweight"), ours, theirs, ref):
        if rf is None or o is None:
            continue
        assert o.shape == rf.shape, name
        assert_close_to_reference(o, t.to(o.dtype), rf, o.dtype if name != "dweight" else x.dtype, name)


def test_add_rms_norm_gradcheck_opcheck_compile():
    x, r = (torch.randn(5, 2, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    pre = lambda *a: fused_norm.add_rms_norm(a[0], a[1], (2, 7), a[2], 1e-6)  # noqa: E731
    post = lambda *a: fused_norm.add_rms_norm_post(a[0], a[1], (2, 7), a[2], 1e-6)  # noqa: E731
    for fn in (pre, post):
        assert torch.autograd.gradcheck(fn, (x, r, w))
        assert torch.autograd.gradgradcheck(fn, (x, r, w))
    for store_sum in (True, False):
        torch.library.opcheck(ops.add_rms_norm_fwd, (x, r, [2, 7], w, 1e-6, 0.0, False, False, store_sum))
        with torch.no_grad():
            _, s, rstd = ops.add_rms_norm_fwd(x, r, [2, 7], w, 1e-6, 0.0, False, False, store_sum)
        args = (s, None) if store_sum else (x.detach(), r.detach())
        torch.library.opcheck(ops.add_rms_norm_bwd, (torch.randn_like(x), torch.randn_like(x) if store_sum else None,
                                                     *args, [2, 7], rstd, w.detach(), 0.0, torch.float64,
                                                     torch.float64))
    norm = fused_norm.FusedAddRMSNorm(7, eps=1e-6).double()
    post_norm = fused_norm.FusedPostAddRMSNorm(7).double()
    assert isinstance(norm, nn.RMSNorm) and norm.state_dict().keys() == nn.RMSNorm(7).state_dict().keys()

    def block(h, res):
        y, res = norm(h, res)
        return post_norm(y.sin(), res)

    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, r)
    torch.testing.assert_close(out, block(x, r))
    torch.testing.assert_close(out, F.rms_norm((F.rms_norm(x + r, (7,), eps=1e-6)).sin() + x + r, (7,)))


# ---------------------------------------------------------------------------------------
# torch.func: vmap of the four add-norm functions (their ops' batching rules) and
# per-sample gradients (vmap of grad), against the same transforms of torch's unfused
# composition and against a loop over the samples.


@pytest.fixture
def no_vmap_fallback():
    """vmap raises instead of falling back to a per-sample loop: the ops' own batching rules
    must run."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


ADD_FNS = ["ln-pre", "ln-post", "rms-pre", "rms-post"]


def _add_fn(kind, fused):
    """f(x, r, w, b) -> a tuple of outputs (output, and the sum for pre-norm); the bias is
    unused by RMSNorm. fused: ours, else torch's composition."""
    norm, pre = kind.split("-")
    pre = pre == "pre"
    n = (8,)

    def ours(x, r, w, b):
        if norm == "ln":
            fn = fused_norm.add_layer_norm if pre else fused_norm.add_layer_norm_post
            out = fn(x, r, n, w, b)
        else:
            fn = fused_norm.add_rms_norm if pre else fused_norm.add_rms_norm_post
            out = fn(x, r, n, w, 1e-6)
        return out if pre else (out,)

    def theirs(x, r, w, b):
        s = x + r
        y = F.layer_norm(s, n, w, b) if norm == "ln" else F.rms_norm(s, n, w, 1e-6)
        return (y.to(x.dtype), s) if pre else (y.to(x.dtype),)

    return ours if fused else theirs


def _vmap_args(dtype, rdtype=None, wdtype=None):
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    x, r = mk(4, 5, 8) * 2 + 0.5, mk(4, 5, 8)
    W, B = mk(4, 8), mk(4, 8)
    return x.to(dtype), r.to(rdtype or dtype), W.to(wdtype or dtype), B.to(wdtype or dtype)


def _loss(f):
    """A loss of the sample's outputs, not quadratic (the statistics' derivatives matter)."""
    def loss(w, b, x, r):
        outs = f(x, r, w, b)
        c = torch.arange(x.numel(), dtype=torch.float64, device=x.device).view(x.shape).cos()
        return sum((o.double().pow(3) * c).sum() for o in outs)
    return loss


# (in_dims of x, r, w, b): mapped input and residual (dim 0, or 1 for x), either one
# unmapped (shared by the samples), per-sample parameters, only the parameters mapped.
VMAP_IN_DIMS = [(0, 0, None, None), (1, 0, None, None), (0, None, None, None), (None, 0, None, None),
                (0, 0, 0, 0), (0, 0, 0, None), (None, None, 0, 0)]


def _vmap_inputs(in_dims, x, r, W, B):
    """The arguments for in_dims: an unmapped one is one sample's (the first)."""
    out = []
    for t, d in zip((x, r, W, B), in_dims):
        out.append(t[0] if d is None else t.movedim(0, d))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ADD_FNS)
def test_vmap_like_torch_and_a_loop(kind, dtype, no_vmap_fallback):
    x, r, W, B = _vmap_args(dtype)
    ours, theirs = _add_fn(kind, True), _add_fn(kind, False)
    for in_dims in VMAP_IN_DIMS:
        args = _vmap_inputs(in_dims, x, r, W, B)
        with count_fused_calls() as calls:
            got = torch.func.vmap(ours, in_dims=in_dims)(*args)
        assert calls.n == 1, in_dims  # one kernel call for the whole batch
        expected = torch.func.vmap(theirs, in_dims=in_dims)(*args)
        loop = [torch.stack(o) for o in zip(*(ours(*(a if d is None else a.select(d, i)
                                                      for a, d in zip(args, in_dims))) for i in range(4)))]
        assert len(got) == len(expected) == len(loop)
        for a, b, c in zip(got, expected, loop):
            assert a.dtype == c.dtype == dtype and a.shape == c.shape
            torch.testing.assert_close(a, b, msg=lambda m: f"{in_dims}: {m}")
            torch.testing.assert_close(a, c, msg=lambda m: f"{in_dims}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ADD_FNS)
def test_per_sample_gradients(kind, dtype, no_vmap_fallback):
    """vmap(grad(loss)): the gradients of each sample's loss w.r.t. weight, bias, input and
    residual, with shared or per-sample parameters and a shared residual; one forward and
    one backward kernel call for the batch."""
    x, r, W, B = _vmap_args(dtype)
    grad = lambda f: torch.func.grad(_loss(f), argnums=(0, 1, 2, 3))  # noqa: E731
    ours, theirs = _add_fn(kind, True), _add_fn(kind, False)
    for in_dims in [(None, None, 0, 0), (0, 0, 0, 0), (None, None, 0, None), (None, None, None, 0)]:
        args = [t if d is not None else t[0] for t, d in zip((W, B, x, r), in_dims)]
        with count_fused_calls() as calls:
            got = torch.func.vmap(grad(ours), in_dims=in_dims)(*args)
        assert calls.n == 2, in_dims
        expected = torch.func.vmap(grad(theirs), in_dims=in_dims)(*args)
        loop = [torch.stack(g) for g in zip(*(grad(ours)(*(a if d is None else a[i] for a, d in zip(args, in_dims)))
                                              for i in range(4)))]
        for what, a, b, c in zip(("weight", "bias", "input", "residual"), got, expected, loop):
            torch.testing.assert_close(a, b, msg=lambda m: f"{in_dims} grad of {what}: {m}")
            torch.testing.assert_close(a, c, msg=lambda m: f"{in_dims} grad of {what}: {m}")


@pytest.mark.parametrize("kind", ADD_FNS)
def test_torch_func_grad_of_grad(kind):
    """torch.func.grad twice (the backward ops differentiated under torch.func too)."""
    x, r, W, B = (t[0] for t in _vmap_args(torch.float64))

    def second(f):
        first = torch.func.grad(_loss(f), argnums=(2, 3))
        return torch.func.grad(lambda w, b, x, r: sum(g.square().sum() for g in first(w, b, x, r)),
                               argnums=(0, 1, 2, 3))(W, B, x, r)

    for what, a, b in zip(("weight", "bias", "input", "residual"), second(_add_fn(kind, True)),
                          second(_add_fn(kind, False))):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", ADD_FNS)
def test_vmap_mixed_precision_residual(kind, no_vmap_fallback):
    """bfloat16 input with a float32 residual (the sum and its gradient in float32, a
    separate residual gradient) and float32 parameters: the batched kernels give what
    they give sample by sample."""
    x, r, W, B = _vmap_args(torch.bfloat16, torch.float32, torch.float32)
    ours = _add_fn(kind, True)
    got = torch.func.vmap(ours, in_dims=(0, 0, None, None))(x, r, W[0], B[0])
    loop = [torch.stack(o) for o in zip(*(ours(x[i], r[i], W[0], B[0]) for i in range(4)))]
    for a, c in zip(got, loop):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    grad = torch.func.grad(_loss(ours), argnums=(0, 1, 2, 3))
    got = torch.func.vmap(grad, in_dims=(None, None, 0, 0))(W[0], B[0], x, r)
    loop = [torch.stack(g) for g in zip(*(grad(W[0], B[0], x[i], r[i]) for i in range(4)))]
    for what, a, c in zip(("weight", "bias", "input", "residual"), got, loop):
        assert a.dtype == c.dtype, what
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * c.abs().max().item(), msg=what)


@pytest.mark.parametrize("kind", ADD_FNS)
def test_vmap_of_vjp(kind, no_vmap_fallback):
    """vmap of a vjp over a batch of cotangents: the backward op mapped over its incoming
    gradients alone (input, residual, statistics and parameters unmapped), one call."""
    primals = [t[0] for t in _vmap_args(torch.float64)]
    g = torch.Generator().manual_seed(3)
    results = []
    for fused in (True, False):
        outs, vjp_fn = torch.func.vjp(_add_fn(kind, fused), *primals)
        cot = tuple(torch.randn((3,) + o.shape, generator=g.manual_seed(3 + i), dtype=o.dtype)
                    for i, o in enumerate(outs))
        with count_fused_calls() as calls:
            results.append(torch.func.vmap(vjp_fn)(cot))
        assert calls.n == (1 if fused else 0)
    for what, a, b in zip(("input", "residual", "weight", "bias"), *results):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------
# TorchScript: the four add-norm modules, alone and in a model, give eager's results.


class _AddNormBlock(nn.Module):
    """Two pre-norm blocks and a post-norm one, as a transformer stacks them."""

    def __init__(self, d, rms, residual_in_fp32=False):
        super().__init__()
        pre, post = ((fused_norm.FusedAddRMSNorm, fused_norm.FusedPostAddRMSNorm) if rms else
                     (fused_norm.FusedAddLayerNorm, fused_norm.FusedPostAddLayerNorm))
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.norm1 = pre(d, residual_in_fp32=residual_in_fp32)
        self.norm2 = pre(d, eps=1e-3, residual_in_fp32=residual_in_fp32)
        self.post = post(d)

    def forward(self, h: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        y, res = self.norm1(self.fc1(h), res)
        y, res = self.norm2(self.fc2(y), res)
        return self.post(y, res.to(y.dtype))


@pytest.mark.parametrize("dtype,rdtype,fp32", [(torch.float32, torch.float32, False),
                                               (torch.bfloat16, torch.float32, False),
                                               (torch.bfloat16, torch.bfloat16, True)],
                         ids=["fp32", "bf16+fp32res", "bf16-res32"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_torchscript(rms, dtype, rdtype, fp32):
    """torch.jit.script of each add-norm module (eps=None RMSNorm: the sum's machine
    epsilon) and of a model holding them: the scripted forward calls the fused op, gives
    eager's outputs bit for bit and the same gradients, and survives jit save/load."""
    torch.manual_seed(0)
    d = 32
    x, r = torch.randn(3, 5, d).to(dtype), torch.randn(3, 5, d).to(rdtype)
    classes = ((fused_norm.FusedAddRMSNorm, fused_norm.FusedPostAddRMSNorm) if rms else
               (fused_norm.FusedAddLayerNorm, fused_norm.FusedPostAddLayerNorm))
    for cls in classes:
        kwargs = {"residual_in_fp32": fp32} if cls in (fused_norm.FusedAddRMSNorm, fused_norm.FusedAddLayerNorm) else {}
        m = cls(d, **kwargs)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            if not rms:
                m.bias.uniform_(-0.5, 0.5)
        scripted = torch.jit.script(m)
        with count_fused_calls() as calls:
            got = scripted(x, r)
        assert calls.n == 1
        expected = m(x, r)
        for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple)
                        else (expected,)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    model = _AddNormBlock(d, rms, fp32)
    if dtype != torch.float32:
        model.fc1.to(dtype), model.fc2.to(dtype)
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    outs = []
    for m in (model, scripted, loaded):
        m.zero_grad()
        h, res = x.clone().requires_grad_(), r.clone().requires_grad_()
        with count_fused_calls() as calls:
            y = m(h, res)
            y.float().square().sum().backward()
        assert calls.n == 6  # three add-norms, forward and backward
        outs.append([y, h.grad, res.grad] + [p.grad for p in m.parameters()])
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
