"""Edges where fused_norm must behave exactly as torch: meta arguments, activation
checkpointing, higher-order and forward-over-reverse gradients, eps, empty and 1-D
inputs, the running statistics' counter, dtypes and devices, inference_mode, memory
formats, large magnitudes, TorchScript and argument errors."""

import itertools

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fused_norm
from conftest import count_fused_calls, raises_like_torch


# --- meta arguments -------------------------------------------------------------------


def test_meta_weightraises_like_torch():
    x = torch.randn(4, 8)
    meta = torch.ones(8, device="meta")
    raises_like_torch(lambda: fused_norm.layer_norm(x, (8,), meta), lambda: F.layer_norm(x, (8,), meta))
    raises_like_torch(lambda: fused_norm.layer_norm(x, (8,), None, meta), lambda: F.layer_norm(x, (8,), None, meta))
    xm = x.to("meta")
    w = torch.ones(8)
    raises_like_torch(lambda: fused_norm.layer_norm(xm, (8,), w), lambda: F.layer_norm(xm, (8,), w))
    # All on meta: shapes only, as torch.
    assert fused_norm.layer_norm(xm, (8,), meta, meta).shape == (4, 8)


@pytest.mark.parametrize("which", ["weight", "running_mean", "running_var"])
def test_meta_batch_norm_argument_raises_and_keeps_the_statistics(which):
    x = torch.randn(4, 3)
    for fn in (F.batch_norm, fused_norm.batch_norm):
        args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3))
        args[which] = args[which].to("meta")
        with pytest.raises(RuntimeError, match="Tensor on device meta is not on the expected device cpu!"):
            fn(x, training=True, **args)
        if fn is fused_norm.batch_norm:  # (torch's own updates its CPU statistics before it raises)
            for name in ("running_mean", "running_var"):
                if name != which:
                    assert torch.equal(args[name], torch.zeros(3) if name == "running_mean" else torch.ones(3))
    m = fused_norm.FusedBatchNorm1d(3)
    m.weight = nn.Parameter(torch.ones(3, device="meta"))
    with pytest.raises(RuntimeError, match="not on the expected device cpu"):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))


# --- activation checkpointing ---------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, bn, tail):
        super().__init__()
        self.bn = bn
        self.tail = nn.Linear(3, 3) if tail else None

    def forward(self, x):
        y = self.bn(x)
        return self.tail(y) if self.tail is not None else y


@pytest.mark.parametrize("tail", [False, True], ids=["bn-last", "bn-then-linear"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpointing_updates_running_stats_as_torch(momentum, reentrant, tail):
    torch.manual_seed(0)
    theirs = _Block(nn.BatchNorm1d(3, momentum=momentum), tail)
    ours = _Block(fused_norm.FusedBatchNorm1d(3, momentum=momentum), tail)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(8, 3) * 2 + step
        grads = []
        for m in (theirs, ours):
            xi = x.clone().requires_grad_()
            y = checkpoint(m, xi, use_reentrant=reentrant)
            y.square().sum().backward()
            grads.append(xi.grad)
        torch.testing.assert_close(grads[1], grads[0])
        for name, t in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], t, msg=f"{name} after step {step}")


# --- gradients ------------------------------------------------------------------------


def test_layer_norm_double_backward_over_every_dim():
    """normalized_shape covering the whole input (no leading dims)."""
    x = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    dy = torch.randn(2, 3, dtype=torch.double)
    grads = []
    for fn in (F.layer_norm, fused_norm.layer_norm):
        y = fn(x, (2, 3), w, b)
        gx, gw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        grads.append(torch.autograd.grad(gx.sum() + gw.square().sum(), (x, w)))
    for a, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradgradcheck(lambda x, w, b: fused_norm.layer_norm(x, (2, 3), w, b), (x, w, b))


def _third_order(fn, x, w, b, u, v):
    """d/d(x, w) of <d/dx <d(fn)/dx . u, v>, ...>: every order kept in the graph."""
    y = fn(x, w, b)
    gx, gw = torch.autograd.grad(y, (x, w), u, create_graph=True)
    hx, hw = torch.autograd.grad((gx * v).sum() + (gw * gw).sum(), (x, w), create_graph=True)
    return torch.autograd.grad((hx * v).sum() + hw.sum(), (x, w, b), allow_unused=True)


def _assert_same_gradients(got, expected):
    for a, e in zip(got, expected):
        if e is None:  # not connected, or only through zeros
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, e)


def _composite_layer_norm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) * ((x - mean).square().mean(-1, keepdim=True) + 1e-5).rsqrt() * w + b


def _composite_batch_norm(x, w, b):
    dims = (0, 2)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    return (x - mean) * (var + 1e-5).rsqrt() * w[:, None] + b[:, None]


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm"])
def test_third_order_gradients(op):
    """Against the norm written in torch ops (torch's own F.layer_norm and training
    F.batch_norm get the third order wrong)."""
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 5)
    x = torch.randn(shape, generator=g, dtype=torch.double, requires_grad=True)
    if op == "layer_norm":
        wshape, ours, composite = (5,), lambda x, w, b: fused_norm.layer_norm(x, (5,), w, b), _composite_layer_norm
    else:
        wshape, composite = (3,), _composite_batch_norm

        def ours(x, w, b):
            return fused_norm.batch_norm(x, torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype), w, b,
                                         training=True)
    w = torch.randn(wshape, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(wshape, generator=g, dtype=torch.double, requires_grad=True)
    u, v = torch.randn(shape, generator=g, dtype=torch.double), torch.randn(shape, generator=g, dtype=torch.double)
    got, expected = _third_order(ours, x, w, b, u, v), _third_order(composite, x, w, b, u, v)
    _assert_same_gradients(got, expected)


def test_third_order_gradients_of_eval_batch_norm_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.double, requires_grad=True)
    w, b = (torch.randn(3, generator=g, dtype=torch.double, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(3, dtype=torch.double), torch.rand(3, dtype=torch.double) + 0.5
    u, v = torch.randn_like(x), torch.randn_like(x)
    got, expected = (_third_order(lambda x, w, b: lib.batch_norm(x, rm.clone(), rv.clone(), w, b), x, w, b, u, v)
                     for lib in (fused_norm, F))
    _assert_same_gradients(got, expected)


def test_forward_over_reverse_gradgradcheck():
    x = torch.randn(3, 2, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: fused_norm.layer_norm(x, (4,), w, b), (x, w, b),
                                        check_fwd_over_rev=True)
    wc = torch.randn(2, dtype=torch.double, requires_grad=True)
    bc = torch.randn(2, dtype=torch.double, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.double), torch.rand(2, dtype=torch.double) + 0.5
    for training in (True, False):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: fused_norm.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training), (x, wc, bc),
            check_fwd_over_rev=True)


# --- BatchNorm arguments --------------------------------------------------------------


@pytest.mark.parametrize("training,eps", [(True, 0.0), (True, -1e-5), (False, -1e-5)])
def test_batch_norm_eps_checks(training, eps):
    x = torch.randn(4, 3)
    stats = lambda: (torch.zeros(3), torch.ones(3))  # noqa: E731
    raises_like_torch(lambda: fused_norm.batch_norm(x, *stats(), training=training, eps=eps),
                       lambda: F.batch_norm(x, *stats(), training=training, eps=eps))
    ours, theirs = fused_norm.FusedBatchNorm1d(3, eps=eps), nn.BatchNorm1d(3, eps=eps)
    ours.train(training), theirs.train(training)
    raises_like_torch(lambda: ours(x), lambda: theirs(x))
    # eval with eps = 0 is fine in torch
    torch.testing.assert_close(fused_norm.batch_norm(x, *stats(), eps=0.0), F.batch_norm(x, *stats(), eps=0.0))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_1d_empty_input(training):
    args = lambda: (torch.empty(0), torch.empty(0), torch.empty(0))  # noqa: E731
    expected = F.batch_norm(*args(), training=training)
    got = fused_norm.batch_norm(*args(), training=training)
    assert got.shape == expected.shape == (0,) and got.dtype == expected.dtype
    got = fused_norm.batch_norm(torch.empty(0), None, None, training=True)
    assert got.shape == (0,)


def test_empty_batch_of_another_dtype_and_layout():
    """torch returns an empty input as it is: no dtype or shape checks, the input's layout."""
    for fused, plain in ((fused_norm.FusedBatchNorm2d(3), nn.BatchNorm2d(3)),):
        x = torch.empty(0, 3, 2, 2, dtype=torch.double)
        assert fused(x).dtype == plain(x).dtype == torch.double
    x = torch.empty(0, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        y = fused_norm.batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(3), training=training)
        assert y.stride() == F.batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(3), training=training).stride()
    xw = torch.empty(0, 3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    y = fused_norm.batch_norm(xw, torch.zeros(3), torch.ones(3), w, training=True)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_cumulative_average_with_any_counter_dtype(dtype):
    theirs, ours = nn.BatchNorm1d(3, momentum=None), fused_norm.FusedBatchNorm1d(3, momentum=None)
    for m in (theirs, ours):
        m.num_batches_tracked = torch.tensor(0, dtype=dtype)
    for step in range(3):
        x = torch.randn(8, 3) + step
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert ours.num_batches_tracked.dtype == dtype and ours.num_batches_tracked.item() == step + 1


def test_functional_momentum_none_is_a_type_error():
    x = torch.randn(4, 3)
    raises_like_torch(lambda: fused_norm.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None),
                       lambda: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_requiring_grad_are_refused(which, training):
    x = torch.randn(4, 3)
    for fn, name in ((F.batch_norm, "native_batch_norm"), (fused_norm.batch_norm, "batch_norm")):
        args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3))
        args[which].requires_grad_()
        with pytest.raises(RuntimeError, match=f"The function '{name}' is not differentiable with respect to "
                                                f"argument '{which}'. This input cannot have requires_grad True."):
            fn(x, training=training, **args)


def test_running_stats_with_forward_grad_are_refused_like_torch():
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 1)
    for training in (False, True):
        for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2), (0, 2)):
            def call(fn):
                with fwAD.dual_level():
                    duals = [fwAD.make_dual(a, torch.ones_like(a)) if i in dual_indices else a.clone()
                             for i, a in enumerate(args)]
                    return fwAD.unpack_dual(fn(*duals, training=training)).tangent

            try:
                expected = call(F.batch_norm)
            except RuntimeError:
                raises_like_torch(lambda: call(fused_norm.batch_norm), lambda: call(F.batch_norm))
                continue
            got = call(fused_norm.batch_norm)
            if expected is None:
                assert got is None
            else:
                torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("shape", [(3, 1), (1, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_running_stats_must_be_one_dimensional(shape, training):
    x = torch.randn(4, 3)
    for fn in (F.batch_norm, fused_norm.batch_norm):
        with pytest.raises(RuntimeError):
            fn(x, torch.zeros(shape), torch.ones(shape), training=training)
    with pytest.raises(RuntimeError, match=r"running_mean should be a 1-D tensor of 3 elements, got shape \[" +
                       ", ".join(map(str, shape))):
        fused_norm.batch_norm(x, torch.zeros(shape), torch.ones(shape), training=training)
    # A (C, 1) weight is fine, as in torch
    w = torch.ones(3, 1)
    torch.testing.assert_close(fused_norm.batch_norm(x, None, None, w, training=True),
                               F.batch_norm(x, None, None, w, training=True))


def test_running_stats_from_inference_mode_train_outside_it():
    with torch.inference_mode():
        stats = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
    x = torch.randn(8, 3)
    for (rm, rv), fn in zip(stats, (F.batch_norm, fused_norm.batch_norm)):
        fn(x, rm, rv, training=True)
    torch.testing.assert_close(stats[1], stats[0])
    assert not torch.equal(stats[1][0], torch.zeros(3))


# --- memory formats -------------------------------------------------------------------


def _layouts():
    """(base, view) pairs of every stride pattern: permutations of 3-, 4- and 5-D tensors
    with sizes of 1 in every position (ambiguous layouts), and non-dense slices."""
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in ((2, 3, 4), (1, 3, 2, 1), (2, 1, 3, 4), (1, 1, 4, 3), (2, 3, 1, 1), (4, 1, 1, 1), (2, 3, 4, 5),
                  (1, 2, 3, 1, 2), (2, 3, 1, 2, 2)):
        for perm in itertools.permutations(range(len(shape))):
            out.append((torch.randn(shape, generator=g, dtype=torch.double), lambda t, perm=perm: t.permute(perm)))
    base = torch.randn(4, 6, 8, 10, generator=g, dtype=torch.double)
    out += [(base, lambda t: t[:, ::2]), (base, lambda t: t[..., ::3]), (base, lambda t: t.permute(0, 2, 3, 1)[:, 1:]),
            (base, lambda t: t[:1, :, :1].transpose(1, 3)),
            (torch.randn(24, generator=g, dtype=torch.double), lambda t: t.as_strided((2, 1, 3, 4), (12, 1, 4, 1)))]
    return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_and_grad_strides_match_torch(training):
    """y and dx have torch's strides; their values are those of the formula in torch ops
    (torch's own CPU backward gets dx wrong for some channels_last inputs of ambiguous
    layout, e.g. (1, 2, 3, 1) with strides (6, 1, 2, 1), and a contiguous gradient)."""
    for base, view in _layouts():
        x = view(base)
        C = x.shape[1]
        if training and x.numel() == C:
            continue  # one value per channel: an error in training
        dims = [0] + list(range(2, x.dim()))
        dy = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view(x.shape).sin()
        strides = []
        for fn in (F.batch_norm, fused_norm.batch_norm):
            leaf = base.clone().requires_grad_()
            xv = view(leaf)
            y = fn(xv, torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype), training=training)
            (dx,) = torch.autograd.grad(y, xv, dy)
            strides.append((y.stride(), dx.stride()))
        assert strides[1] == strides[0], (x.shape, x.stride(), strides)
        xd = x.clone().requires_grad_()
        mean = xd.mean(dims, keepdim=True) if training else torch.zeros((), dtype=x.dtype)
        var = (xd - mean).square().mean(dims, keepdim=True) if training else torch.ones((), dtype=x.dtype)
        ref = (xd - mean) * (var + 1e-5).rsqrt()
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(dx, torch.autograd.grad(ref, xd, dy)[0])


def test_issue_layouts():
    x = torch.arange(6.).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    assert fused_norm.batch_norm(x, None, None, training=True).stride() == (6, 1, 2, 2)
    x = torch.empty_strided((2, 1, 3, 4), (12, 1, 4, 1)).normal_()
    assert fused_norm.batch_norm(x, None, None, training=True).stride() == (12, 12, 4, 1)


# --- TorchScript ----------------------------------------------------------------------


@pytest.mark.parametrize("name,shape", [("LayerNorm", (2, 5, 4)), ("BatchNorm1d", (6, 4)),
                                        ("BatchNorm2d", (2, 4, 3, 3)), ("BatchNorm3d", (2, 4, 2, 3, 3))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torchscript(name, shape, momentum):
    kwargs = {} if name == "LayerNorm" else dict(momentum=momentum)
    if name == "LayerNorm" and momentum is None:
        pytest.skip("no momentum")
    theirs = getattr(nn, name)(4, **kwargs)
    ours = getattr(fused_norm, f"Fused{name}")(4, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    scripted_theirs, scripted = torch.jit.script(theirs), torch.jit.script(ours)
    for training in (True, False):
        scripted.train(training), scripted_theirs.train(training)
        x = torch.randn(shape)
        with count_fused_calls() as count:
            got = scripted(x)
        assert count.n == 1
        torch.testing.assert_close(got, scripted_theirs(x))
        for k, v in scripted_theirs.state_dict().items():
            torch.testing.assert_close(scripted.state_dict()[k], v)


# --- argument errors ------------------------------------------------------------------


def _bad_layer_norm_calls():
    x = torch.randn(4, 8)
    return [
        ((x, (8.0,)), {}),
        ((x, 8), {}),
        ((x, (8,)), dict(eps="1e-5")),
        ((np.ones((4, 8), dtype=np.float32), (8,)), {}),
        (([[1.0, 2.0]], (2,)), {}),
        ((x, (8,), np.ones(8)), {}),
        ((torch.randn(4, 8, dtype=torch.bfloat16), (8,), torch.ones(8, dtype=torch.bfloat16), torch.ones(8)), {}),
    ]


@pytest.mark.parametrize("case", range(len(_bad_layer_norm_calls())))
def test_layer_norm_argument_errors_like_torch(case):
    args, kwargs = _bad_layer_norm_calls()[case]
    raises_like_torch(lambda: fused_norm.layer_norm(*args, **kwargs), lambda: F.layer_norm(*args, **kwargs))


def _bad_batch_norm_calls():
    x = torch.randn(4, 3)
    c = torch.zeros(3)
    return [
        ((np.ones((4, 3), dtype=np.float32), None, None), dict(training=True)),
        ((np.ones((4, 3), dtype=np.float32), c, c), {}),
        ((x, None, None), dict(training=True, eps="1e-5")),
        ((x, c, c.numpy()), {}),
        ((x, c, c), dict(training=True, momentum=None)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_batch_norm_calls())))
def test_batch_norm_argument_errors_like_torch(case):
    """The exception type of torch's (its message where ours has the same cause)."""
    args, kwargs = _bad_batch_norm_calls()[case]
    with pytest.raises(Exception) as t:
        F.batch_norm(*args, **kwargs)
    with pytest.raises(type(t.value)):
        fused_norm.batch_norm(*args, **kwargs)


# --- large magnitudes -----------------------------------------------------------------


@pytest.mark.parametrize("scale,cols", [(1e18, 64), (3e17, 1024), (1e20, 64), (1e30, 1000)])
def test_layer_norm_large_magnitudes_keep_their_moments(scale, cols):
    """float32 data whose squares overflow float: the statistics are those of float64
    (torch's own statistics overflow from about 1e19 on, to NaN)."""
    x = torch.randn(64, cols) * scale
    w, b = torch.randn(cols), torch.randn(cols)
    ref = F.layer_norm(x.double(), (cols,), w.double(), b.double())
    torch.testing.assert_close(fused_norm.layer_norm(x, (cols,), w, b), ref.float(), atol=1e-4, rtol=1e-4)
    y, mean, rstd = torch.ops.fused_norm.layer_norm_fwd(x, [cols], None, None, 1e-5)
    torch.testing.assert_close(mean.double(), x.double().mean(-1, keepdim=True), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(rstd.double(), 1 / x.double().var(-1, correction=0, keepdim=True).sqrt(), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("scale", [1e18, 1e20])
@pytest.mark.parametrize("fmt", ["NCL", "NC", "channels_last"])
def test_batch_norm_large_magnitudes_keep_their_moments(fmt, scale):
    shape = {"NCL": (4, 3, 50), "NC": (300, 3), "channels_last": (4, 3, 5, 10)}[fmt]
    x = torch.randn(shape) * scale
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = fused_norm.batch_norm(x, rm, rv, training=True)
    rmd, rvd = torch.zeros(3, dtype=torch.double), torch.ones(3, dtype=torch.double)
    ref = F.batch_norm(x.double(), rmd, rvd, training=True)
    torch.testing.assert_close(y, ref.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rm.double(), rmd, rtol=0, atol=1e-5 * scale)
    if scale < 1e19:
        torch.testing.assert_close(rv.double(), rvd, rtol=1e-5, atol=0)
    else:  # the float32 running variance overflows: it shows
        assert rv.isinf().all()


def test_overflow_shows_as_nan():
    """Data whose differences overflow float (or, in bfloat16, whose variance does) give
    NaN, never a plausible finite output."""
    x = torch.tensor([[3e38, -3e38, 1.0, 2.0]])
    assert fused_norm.layer_norm(x, (4,)).isnan().all()
    xb = (torch.randn(8, 64) * 1e20).bfloat16()
    assert fused_norm.layer_norm(xb, (64,)).isnan().all()
    xt = torch.tensor([[3e38], [-3e38], [1.0]]).expand(3, 2).contiguous()
    assert fused_norm.batch_norm(xt, None, None, training=True).isnan().all()
