"""The CUDA kernels, run on the CPU under the emulator (fused_norm.testing), against torch.

Every case runs under the forward, reverse and a seeded random thread order: the outputs
must be bitwise identical across the three (a missing barrier or a race shows as a
difference; reverse order alone hides some), and within the usual tolerances of torch
(computed in the same dtype and in float64). The cases reach every tier and branch of
the launchers and kernels: LayerNorm's warp-group, block and streaming tiers in both
directions (RMSNorm's too, with its weight offset and rounding point), vector and scalar
accesses (odd widths, unaligned pointers, strided rows), the residual-add forms of
both norms (pre-norm with the sum stored, post-norm with it formed again in the backward;
the float32 residual stream of fp16/bf16 inputs),
BatchNorm's two layouts with and without split reductions, its finalize kernel, the
vector straddling two planes, scalar tails, eval and training, the synchronized-BatchNorm
phases, and small SM counts that make the grid-stride loops repeat. Skipped unless the
build holds the emulated kernels (FUSED_NORM_CUDA_EMULATION=1).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPE_IDS, DTYPES, assert_accurate, assert_close_to_reference
from fused_norm import testing

pytestmark = pytest.mark.skipif(not testing.emulation_available(), reason="built without the CUDA emulator")

ops = torch.ops.fused_norm
SCHEDULES = ("forward", "reverse", "random:7")

def _bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def run_schedules(fn, sms=2):
    """fn() under every schedule; checks that it launched emulated kernels and that its
    outputs (a tuple of tensors) are bitwise identical across schedules. Returns them."""
    results = []
    for schedule in SCHEDULES:
        with testing.emulate_cuda(schedule=schedule, sms=sms):
            before = testing.emulated_launches()
            out = fn()
            assert testing.emulated_launches() > before, "the emulated CUDA kernels did not run"
        results.append(out)
    for schedule, other in zip(SCHEDULES[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], other, strict=True)):
            assert a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(_bits(a), _bits(b)), f"output {i} differs between {SCHEDULES[0]} and {schedule}"
    return results[0]


def _rows(rows, cols, dtype, layout, scale=1.0):
    """(rows, cols) values whose rows are contiguous ('contiguous'), padded ('strided'),
    or start one element past an aligned address ('offset', so no 16-byte vectors)."""
    if layout == "contiguous":
        base = torch.randn(rows, cols, dtype=torch.float64)
        out = base
    elif layout == "strided":
        out = torch.randn(rows, cols + 8, dtype=torch.float64)[:, :cols]
    else:
        out = torch.randn(rows * cols + 1, dtype=torch.float64)[1:].view(rows, cols)
    return (out * scale + 0.5).to(dtype)


# (rows, cols): for each dtype's 16-byte vector width, the warp tier with groups of
# 1..32 lanes and 1..8 vectors per lane, the block tier, and the streaming tier in both
# directions; odd widths take the scalar path (its own tier limits).
LN_SHAPES = [
    (5, 8),
    (37, 32),
    (19, 64),
    (9, 256),
    (6, 1024),
    (3, 2048),
    (4, 8192),
    (3, 20000),
    (7, 1),
    (6, 3),
    (9, 33),
    (5, 255),
    (3, 1025),
    (2, 5003),
]


def _ln_check(rows, cols, dtype, wdtype, layout="contiguous", affine=(True, True), sms=2):
    x = _rows(rows, cols, dtype, layout)
    dy = _rows(rows, cols, dtype, layout)
    w = (torch.rand(cols, dtype=torch.float64) + 0.5).to(wdtype) if affine[0] else None
    b = torch.randn(cols, dtype=torch.float64).to(wdtype) if affine[1] else None
    eps = 1e-5

    def ours():
        y, mean, rstd = ops.layer_norm_fwd(x, [cols], w, b, eps)
        dx, dw, db = ops.layer_norm_bwd(dy, x, [cols], mean, rstd, w, b)
        return y, mean, rstd, dx, dw, db

    y, mean, rstd, dx, dw, db = run_schedules(ours, sms=sms)

    def reference(t):
        cast = (lambda v: v.double()) if t == torch.float64 else (lambda v: v)
        leaves = [cast(v).detach().requires_grad_() if v is not None else None for v in (x, w, b)]
        out = F.layer_norm(leaves[0], (cols,), leaves[1], leaves[2], eps)
        grads = torch.autograd.grad(out, [v for v in leaves if v is not None], dy.to(out.dtype))
        return out, grads

    theirs, theirs_g = reference(dtype)
    ref, ref_g = reference(torch.float64)
    assert_close_to_reference(y, theirs, ref, dtype, "y")
    ours_g = [dx] + [g for g, v in ((dw, w), (db, b)) if v is not None]
    for name, o, t, r in zip(("dx", "dweight", "dbias"), ours_g, theirs_g, ref_g):
        assert_accurate(o, t, r, dtype, name, ulps=16)  # parameter gradients: at x's precision
    _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(x.double(), [cols], None, None, eps)
    torch.testing.assert_close(mean.double().view(-1), t_mean.view(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double().view(-1), t_rstd.view(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,cols", LN_SHAPES)
def test_layer_norm_tiers(rows, cols, dtypes):
    _ln_check(rows, cols, *dtypes)


@pytest.mark.parametrize("layout", ["strided", "offset"])
@pytest.mark.parametrize("rows,cols", [(9, 64), (5, 1024), (3, 8192), (2, 20000)])
def test_layer_norm_row_layouts(rows, cols, layout):
    _ln_check(rows, cols, torch.bfloat16, torch.float32, layout=layout)


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("rows,cols", [(37, 64), (3, 2048), (3, 20000)])
def test_layer_norm_without_parameters(rows, cols, affine):
    _ln_check(rows, cols, torch.float32, torch.float32, affine=affine)


@pytest.mark.parametrize("sms", [1, 3, 132])
@pytest.mark.parametrize("rows,cols", [(130, 64), (40, 1024), (9, 20000)])
def test_layer_norm_sm_counts(rows, cols, sms):
    """Grid-stride loops that repeat (few SMs) and grids of many blocks (an H100's 132)."""
    _ln_check(rows, cols, torch.float32, torch.float32, sms=sms)


def _rms_check(rows, cols, dtype, wdtype, layout="contiguous", weight=True, mode="torch", sms=2):
    """RMSNorm through the LayerNorm kernels (p.rms): y, rstd, dx, dweight; mode "gemma"
    adds 1 to the weight, "llama" rounds x_hat to x's dtype before the weight."""
    x = _rows(rows, cols, dtype, layout)
    dy = _rows(rows, cols, dtype, layout)
    w = (torch.rand(cols, dtype=torch.float64) + 0.5).to(wdtype) if weight else None
    eps = 1e-5
    offset, round_xhat = {"torch": (0.0, False), "gemma": (1.0, False), "llama": (0.0, True)}[mode]

    def ours():
        y, rstd = ops.rms_norm_fwd(x, [cols], w, eps, offset, round_xhat)
        dx, dw = ops.rms_norm_bwd(dy, x, [cols], rstd, w, offset)
        return y, rstd, dx, dw

    y, rstd, dx, dw = run_schedules(ours, sms=sms)

    def reference(t):
        cast = (lambda v: v.double()) if t == torch.float64 else (lambda v: v)
        leaves = [cast(v).detach().requires_grad_() if v is not None else None for v in (x, w)]
        xf = leaves[0].double() if t == torch.float64 else leaves[0].float()
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if round_xhat and t != torch.float64:
            xhat = xhat.to(dtype).to(xhat.dtype)
        out = xhat * (leaves[1].to(xhat.dtype) + offset) if w is not None else xhat
        out = out.to(leaves[0].dtype)
        grads = torch.autograd.grad(out, [v for v in leaves if v is not None], dy.to(out.dtype))
        return out, grads

    theirs, theirs_g = reference(dtype)
    ref, ref_g = reference(torch.float64)
    assert_accurate(y, theirs, ref, dtype, "y")
    for name, o, t, r in zip(("dx", "dweight"), [dx] + ([dw] if w is not None else []), theirs_g, ref_g):
        assert_accurate(o, t, r, dtype, name, ulps=16)
    t_rstd = x.double().pow(2).mean(-1).add(eps).rsqrt()
    torch.testing.assert_close(rstd.double().view(-1), t_rstd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,cols", LN_SHAPES)
def test_rms_norm_tiers(rows, cols, dtypes):
    _rms_check(rows, cols, *dtypes)


@pytest.mark.parametrize("mode", ["gemma", "llama"])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2], DTYPES[4]], ids=["fp32", "bf16", "bf16+fp32w"])
@pytest.mark.parametrize("rows,cols", [(37, 64), (6, 1024), (3, 20000), (5, 255), (2, 5003)])
def test_rms_norm_hf_modes(rows, cols, dtypes, mode):
    _rms_check(rows, cols, *dtypes, mode=mode)


@pytest.mark.parametrize("layout", ["strided", "offset"])
@pytest.mark.parametrize("rows,cols", [(9, 128), (5, 1024), (2, 20000)])
def test_rms_norm_row_layouts_and_no_weight(rows, cols, layout):
    _rms_check(rows, cols, torch.bfloat16, torch.float32, layout=layout)
    _rms_check(rows, cols, torch.float32, torch.float32, layout=layout, weight=False)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("rows,cols", [(700, 64), (300, 128), (9, 20000)])
def test_rms_norm_qk_norm_rows_and_sm_counts(rows, cols, sms):
    """Many narrow rows (per-head QK-norm: several rows per warp, grid-stride loops)."""
    _rms_check(rows, cols, torch.bfloat16, torch.bfloat16, sms=sms)


# ---------------------------------------------------------------------------------------
# Residual add + LayerNorm / RMSNorm (add_layer_norm_fwd/bwd, add_rms_norm_fwd/bwd).

def _add_check(rows, cols, dtype, rdtype, wdtype, fp32=False, rms=False, layout="contiguous", sms=2,
               weight=True, mode="torch"):
    """Both forms through the emulated kernels: pre-norm (the sum stored; the backward from
    it, with the sum's gradient added) and post-norm (no sum stored; the backward forms it
    again from input and residual). Against torch's unfused composition in the working
    dtype and in float64, and the sum bit for bit against the rounded sum. RMSNorm's mode
    as in _rms_check."""
    x = _rows(rows, cols, dtype, layout, scale=2.0)
    r = _rows(rows, cols, rdtype, layout)
    sdt = torch.float32 if fp32 else rdtype
    dy = _rows(rows, cols, dtype, layout)
    ds = _rows(rows, cols, sdt, layout)
    w = (torch.rand(cols, dtype=torch.float64) + 0.5).to(wdtype) if weight else None
    b = torch.randn(cols, dtype=torch.float64).to(wdtype) if weight and not rms else None
    eps = 1e-5
    offset, round_xhat = {"torch": (0.0, False), "gemma": (1.0, False), "llama": (0.0, True)}[mode]

    def fwd(store):
        if rms:
            y, s, rstd = ops.add_rms_norm_fwd(x, r, [cols], w, eps, offset, round_xhat, fp32, store)
            return y, s, None, rstd
        return ops.add_layer_norm_fwd(x, r, [cols], w, b, eps, fp32, store)

    def bwd(dsum, xs, res, mean, rstd):
        if rms:
            dx, dres, dw = ops.add_rms_norm_bwd(dy, dsum, xs, res, [cols], rstd, w, offset, sdt, rdtype)
            return dx, dres, dw, None
        return ops.add_layer_norm_bwd(dy, dsum, xs, res, [cols], mean, rstd, w, b, sdt, rdtype)

    def ours():
        y, s, mean, rstd = fwd(True)
        pre = (y, s, rstd) + bwd(ds, s, None, mean, rstd)[:3]
        y_post, s_post, _, rstd_post = fwd(False)
        post = (y_post, s_post, rstd_post) + bwd(None, x, r, mean, rstd)[:3]
        # from the stored sum without its gradient (only the output reached the loss)
        return pre + post + bwd(None, s, None, mean, rstd)[:3]

    out = run_schedules(ours, sms=sms)
    has_w = w is not None
    pre, post = out[:6], out[6:12]  # y, s, rstd, dx, dres, dw (empty without weight) per form
    for read, formed in zip(out[12:], post[3:]):  # the same rows, read or formed again: the same bits
        assert torch.equal(_bits(read), _bits(formed))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    exact_sum = (x.to(acc) + r.to(acc)).to(sdt)
    assert torch.equal(_bits(pre[1]), _bits(exact_sum)), "the stored sum is not the rounded sum"
    assert post[1].numel() == 0
    torch.testing.assert_close(post[0], pre[0], rtol=0, atol=0)  # the same rows, whichever form

    def reference(t, with_ds):
        wide = t == torch.float64
        leaves = [(v.double() if wide else v).detach().requires_grad_() if v is not None else None
                  for v in (x, r, w, b)]
        s = leaves[0].to(acc) + leaves[1].to(acc)
        s = s.to(sdt).to(torch.float64) if wide else s.to(sdt)  # float64: of the rounded sum
        p = [v.to(acc if rms and not wide else s.dtype) if v is not None else None for v in leaves[2:]]
        if rms:  # torch's rms_norm, with the Hugging Face modes
            sa = s if wide else s.to(acc)
            o = sa * torch.rsqrt(sa.pow(2).mean(-1, keepdim=True) + eps)
            if round_xhat and not wide:
                o = o.to(dtype).to(acc)
            o = o * (p[0] + offset) if w is not None else o
        else:
            o = F.layer_norm(s, (cols,), p[0], p[1], eps)
        o = o.to(torch.float64 if wide else dtype)
        loss = (o.double() * dy.double()).sum() + ((s.double() * ds.double()).sum() if with_ds else 0)
        grads = torch.autograd.grad(loss, [v for v in leaves if v is not None])
        return o, grads

    for form, with_ds in ((pre, True), (post, False)):
        theirs, theirs_g = reference(dtype, with_ds)
        ref, ref_g = reference(torch.float64, with_ds)
        assert_accurate(form[0], theirs, ref, dtype, "y")
        dres = form[4] if rdtype != dtype else form[3]
        assert form[4].numel() == (0 if rdtype == dtype else x.numel())
        ours_g = [form[3], dres] + ([form[5]] if has_w else [])
        for name, o, t_, r_ in zip(("dx", "dresidual", "dweight"), ours_g, theirs_g, ref_g):
            assert_accurate(o, t_.to(o.dtype), r_, o.dtype if name != "dweight" else dtype, name, ulps=16)


# (input, residual, parameters, residual_in_fp32): same-dtype, the float32 residual
# stream of fp16/bf16 models, and a float32 sum of a bf16 residual.
ADD_DTYPES = [
    (torch.float32, torch.float32, torch.float32, False),
    (torch.float64, torch.float64, torch.float64, False),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    (torch.float16, torch.float32, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, torch.float32, True),
]
ADD_DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16+fp32res", "bf16-sum32+fp32w"]
# The warp tier (one and several vectors per lane), the block and streaming tiers, and
# the scalar path (odd widths: its own warp, block and streaming tiers).
ADD_SHAPES = [(37, 64), (9, 768), (3, 4096), (2, 20000), (9, 33), (3, 1025), (2, 5003)]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtypes", ADD_DTYPES, ids=ADD_DTYPE_IDS)
@pytest.mark.parametrize("rows,cols", ADD_SHAPES)
def test_add_norm_tiers(rows, cols, dtypes, rms):
    dtype, rdtype, wdtype, fp32 = dtypes
    _add_check(rows, cols, dtype, rdtype, wdtype, fp32=fp32, rms=rms)


@pytest.mark.parametrize("layout", ["strided", "offset"])
@pytest.mark.parametrize("rows,cols", [(9, 64), (5, 1024), (2, 20000)])
def test_add_norm_row_layouts(rows, cols, layout):
    """Strided rows (vectors, the row strides honoured) and misaligned ones (scalar)."""
    _add_check(rows, cols, torch.bfloat16, torch.float32, torch.float32, layout=layout)
    _add_check(rows, cols, torch.float32, torch.float32, torch.float32, rms=True, layout=layout)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("rows,cols", [(300, 128), (40, 1024), (9, 20000)])
def test_add_norm_sm_counts_and_no_weight(rows, cols, sms):
    _add_check(rows, cols, torch.float32, torch.float32, torch.float32, sms=sms, weight=False)
    _add_check(rows, cols, torch.bfloat16, torch.bfloat16, torch.bfloat16, rms=True, sms=sms)


@pytest.mark.parametrize("mode", ["gemma", "llama"])
@pytest.mark.parametrize("rows,cols", [(37, 64), (3, 4096), (2, 20000), (3, 1025)])
def test_add_rms_norm_hf_modes(rows, cols, mode):
    _add_check(rows, cols, torch.bfloat16, torch.bfloat16, torch.float32, rms=True, mode=mode)
    _add_check(rows, cols, torch.float16, torch.float32, torch.float32, rms=True, mode=mode)


def test_add_norm_misaligned_residual_only():
    """An aligned input with a residual one element off: every access falls back to
    scalar, and the results equal those of aligned copies."""
    rows, cols = 6, 1024
    x = torch.randn(rows, cols)
    r = torch.randn(rows * cols + 1)[1:].view(rows, cols)
    w, b = torch.rand(cols) + 0.5, torch.randn(cols)
    with testing.emulate_cuda(schedule="forward", sms=2):
        odd = ops.add_layer_norm_fwd(x, r, [cols], w, b, 1e-5, False, True)
        even = ops.add_layer_norm_fwd(x, r.clone(), [cols], w, b, 1e-5, False, True)
    for a, c in zip(odd, even):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_layer_norm_backward_workspace_is_bounded():
    """Rows of 2^20 columns on 132 SMs: 40 blocks would take 2 x 40 partial rows of 4 MiB
    (320 MiB) of workspace; it is bounded at 256 MiB (fewer blocks, each walking more rows),
    with the same results."""
    rows, cols = 40, 2**20
    x = torch.randn(rows, cols, dtype=torch.bfloat16)
    dy = torch.randn(rows, cols, dtype=torch.bfloat16)
    w = torch.rand(cols, dtype=torch.bfloat16) + 0.5
    y, mean, rstd = ops.layer_norm_fwd(x, [cols], w, None, 1e-5)
    expected = ops.layer_norm_bwd(dy, x, [cols], mean, rstd, w, None)  # CPU kernels
    with testing.emulate_cuda(schedule="forward", sms=132):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            dx, dw, _ = ops.layer_norm_bwd(dy, x, [cols], mean, rstd, w, None)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name == "aten::empty")
    assert largest == 16 + 32 * 2 * cols * 4  # the workspace: 32 blocks' two fp32 rows, 16 bytes of slack
    torch.testing.assert_close(dx, expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dw.float(), expected[1].float(), rtol=2e-2, atol=2e-1)


# ---------------------------------------------------------------------------------------
# BatchNorm.

def _bn_input(shape, dtype, layout):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "nlc":  # (N, C, L) stored as (N, L, C)
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "offset":
        flat = torch.randn(x.numel() + 1, dtype=torch.float64)[1:]
        x = flat.view(shape)
    return x.to(dtype)


def _bn_check(shape, dtype, wdtype, layout="contiguous", training=True, momentum=0.1, affine=True, sms=2):
    C = shape[1]
    x = _bn_input(shape, dtype, layout)
    dy = _bn_input(shape, dtype, layout)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(wdtype) if affine else None
    b = torch.randn(C, dtype=torch.float64).to(wdtype) if affine else None
    rm = torch.randn(C, dtype=torch.float64).to(wdtype)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(wdtype)
    nbt = torch.tensor(3, dtype=torch.long)
    eps = 1e-5

    def ours():
        new_rm, new_rv = rm.clone(), rv.clone()  # updated in place when training
        y, mean, invstd = ops.batch_norm_fwd(x, w, b, new_rm, new_rv, nbt, training, momentum, eps)
        dx, dw, db = ops.batch_norm_bwd(dy, x, w, b, mean, invstd, training)
        return (y, mean, invstd, new_rm, new_rv, dx) + ((dw, db) if affine else ())

    out = run_schedules(ours, sms=sms)
    y, dx = out[0], out[5]

    def reference(t):
        cast = (lambda v: v.double().clone()) if t == torch.float64 else (lambda v: v.clone())
        leaves = [cast(v).detach().requires_grad_() if v is not None else None for v in (x, w, b)]
        r_m, r_v = cast(rm), cast(rv)
        f = 1.0 / nbt.item() if momentum is None else momentum  # momentum=None: 1 / num_batches_tracked
        o = F.batch_norm(leaves[0], r_m, r_v, leaves[1], leaves[2], training, f, eps)
        grads = torch.autograd.grad(o, [v for v in leaves if v is not None], dy.to(o.dtype))
        return o, grads, r_m, r_v

    theirs, theirs_g, t_rm, t_rv = reference(dtype)
    ref, ref_g, r_rm, r_rv = reference(torch.float64)
    assert_close_to_reference(y, theirs, ref, dtype, "y")
    ours_g = [dx] + ([out[6], out[7]] if affine else [])
    # The reductions accumulate in fp32 (fp64) in the CUDA kernels' order, where torch's
    # CPU kernels sum in double: sums over thousands of values (whose errors reach dx
    # through the mean times sum(dy)) are allowed 64 ulps of the largest value beyond
    # torch's error.
    for name, o, t, r in zip(("dx", "dweight", "dbias"), ours_g, theirs_g, ref_g):
        assert_accurate(o, t, r, dtype, name, ulps=64)
    if training:
        assert_accurate(out[3], t_rm, r_rm, wdtype, "running_mean", ulps=64)
        assert_accurate(out[4], t_rv, r_rv, wdtype, "running_var", ulps=64)


# Shapes: NCS planes with S a multiple of every vector width, odd S (scalar), S not a
# multiple of the width (vectors straddling two planes, scalar tail); small C over many
# values (split reductions, along planes and along a plane's vectors: finalize kernel);
# C == 1; (N, C) rows.
BN_SHAPES = [
    ((4, 3, 16, 16), "contiguous"),
    ((3, 5, 7, 7), "contiguous"),
    ((2, 3, 9), "contiguous"),
    ((16, 3, 1024), "contiguous"),
    ((1, 2, 16384), "contiguous"),
    ((6, 1, 10, 10), "contiguous"),
    ((4, 16, 5, 5), "channels_last"),
    ((3, 7, 3, 3), "channels_last"),
    ((2048, 8), "contiguous"),
    ((300, 37), "contiguous"),
    ((4, 24, 9), "nlc"),
    ((2, 6, 8, 8), "offset"),
]


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,layout", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_layouts(shape, layout, training, dtypes):
    _bn_check(shape, *dtypes, layout=layout, training=training)


@pytest.mark.parametrize("shape,layout", [((4, 3, 8, 8), "contiguous"), ((300, 24), "contiguous")])
def test_batch_norm_cumulative_and_no_affine(shape, layout):
    _bn_check(shape, torch.float32, torch.float32, layout=layout, momentum=None, affine=False)


@pytest.mark.parametrize("sms", [1, 5, 132])
@pytest.mark.parametrize("shape,layout", [((16, 3, 1024), "contiguous"), ((2048, 24), "contiguous"),
                                          ((8, 64, 6, 6), "channels_last")])
def test_batch_norm_sm_counts(shape, layout, sms):
    _bn_check(shape, torch.float32, torch.float32, layout=layout, sms=sms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,layout", [((16, 3, 1024), "contiguous"), ((5, 6, 4, 4), "channels_last"),
                                          ((3, 5, 7), "contiguous")])
def test_sync_batch_norm_phases(shape, layout, dtype):
    """batch_norm_stats, batch_norm_bwd_reduce and batch_norm_bwd_elemt (one process)."""
    x = _bn_input(shape, dtype, layout)
    dy = _bn_input(shape, dtype, layout)
    C = shape[1]
    w = torch.rand(C, dtype=dtype) + 0.5
    n = x.numel() // C
    count = torch.tensor(n, dtype=torch.long)
    dims = [d for d in range(x.dim()) if d != 1]

    def ours():
        mean, var = ops.batch_norm_stats(x)
        invstd = (var + 1e-5).rsqrt()
        sum_dy, sum_dy_xmu = ops.batch_norm_bwd_reduce(dy, x, mean)
        dx = ops.batch_norm_bwd_elemt(dy, x, w, mean, invstd, sum_dy, sum_dy_xmu, count)
        return mean, var, sum_dy, sum_dy_xmu, dx

    mean, var, sum_dy, sum_dy_xmu, dx = run_schedules(ours)
    xd, dyd = x.double(), dy.double()
    shape_c = [1, C] + [1] * (x.dim() - 2)
    r_mean = xd.mean(dims)
    r_var = xd.var(dims, unbiased=False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float64 else {}
    torch.testing.assert_close(mean.double(), r_mean, **tol)
    torch.testing.assert_close(var.double(), r_var, **tol)
    r_sum_dy = dyd.sum(dims)
    r_sum_dy_xmu = (dyd * (xd - mean.double().view(shape_c))).sum(dims)
    torch.testing.assert_close(sum_dy.double(), r_sum_dy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_dy_xmu.double(), r_sum_dy_xmu, rtol=1e-5, atol=1e-4)
    inv = (var.double() + 1e-5).rsqrt().view(shape_c)
    r_dx = (dyd - r_sum_dy.view(shape_c) / n - (xd - mean.double().view(shape_c)) * inv**2
            * r_sum_dy_xmu.view(shape_c) / n) * inv * w.double().view(shape_c)
    low = dtype in (torch.float16, torch.bfloat16)
    torch.testing.assert_close(dx.double(), r_dx, rtol=1e-2 if low else 1e-5, atol=1e-2 if low else 1e-5)


# ---------------------------------------------------------------------------------------
# Error paths of the launchers, as a CUDA build reports them.

def test_device_query_failure_is_reported():
    """A failing SM-count query surfaces as that CUDA error, from the forward and from the
    workspace-size queries of the backward."""
    from fused_norm import _C
    x = torch.randn(4, 32)
    with testing.emulate_cuda():
        _C.set_emulated_device_failure(True)
        try:
            with pytest.raises(RuntimeError, match="no CUDA-capable device"):
                ops.layer_norm_fwd(x, [32], None, None, 1e-5)
            rows = torch.zeros(4, 1)
            with pytest.raises(RuntimeError, match="no CUDA-capable device"):
                ops.layer_norm_bwd(x, x, [32], rows, rows, torch.ones(32), None)
            with pytest.raises(RuntimeError, match="no CUDA-capable device"):
                ops.batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5)
            with pytest.raises(RuntimeError, match="no CUDA-capable device"):
                ops.batch_norm_bwd(x, x, torch.ones(32), None, torch.zeros(32), torch.ones(32), True)
        finally:
            _C.set_emulated_device_failure(False)


def test_emulation_switch_restores():
    from fused_norm import _C
    before = (_C.cuda_emulation(), _C.emulated_schedule(), _C.emulated_sms())
    with testing.emulate_cuda(schedule="random:3", sms=5):
        assert (_C.cuda_emulation(), _C.emulated_schedule(), _C.emulated_sms()) == (True, "random:3", 5)
        n = testing.emulated_launches()
        ops.layer_norm_fwd(torch.randn(3, 8), [8], None, None, 1e-5)
        assert testing.emulated_launches() == n + 1
    assert (_C.cuda_emulation(), _C.emulated_schedule(), _C.emulated_sms()) == before
    n = testing.emulated_launches()
    ops.layer_norm_fwd(torch.randn(3, 8), [8], None, None, 1e-5)
    assert testing.emulated_launches() == n  # the CPU kernels ran
    with pytest.raises(ValueError, match="unknown schedule"):
        with testing.emulate_cuda(schedule="sideways"):
            pass


def test_environment_switches():
    """FUSED_NORM_EMULATE_CUDA / _SCHEDULE / _SMS at import set emulation up."""
    import os
    import subprocess
    import sys
    code = ("import torch, fused_norm; from fused_norm import _C, testing; "
            "assert _C.cuda_emulation() and _C.emulated_schedule() == 'reverse' and _C.emulated_sms() == 7; "
            "torch.ops.fused_norm.layer_norm_fwd(torch.randn(3, 8), [8], None, None, 1e-5); "
            "assert testing.emulated_launches() == 1")
    env = dict(os.environ, FUSED_NORM_EMULATE_CUDA="1", FUSED_NORM_EMULATE_CUDA_SCHEDULE="reverse",
               FUSED_NORM_EMULATE_CUDA_SMS="7")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)  # the same fused_norm as this process
