"""fused_norm.batch_norm / FusedBatchNorm1d/2d/3d against torch.nn.functional.batch_norm /
nn.BatchNorm1d/2d/3d."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_norm
from conftest import DTYPE_IDS, DTYPES, assert_accurate, assert_gradients_of_every_subset, cpu_capabilities, raises_like_torch

ops = torch.ops.fused_norm

CL, CL3 = torch.channels_last, torch.channels_last_3d
# (shape, memory format): every kernel layout (planes, rows of channels, one channel),
# runs longer than a block, more channels than a block, odd sizes.
SHAPES = [
    ((9, 5), None),
    ((300, 2100), None),
    ((4, 5, 7), None),
    ((2, 3, 4100), None),
    ((2, 1, 3000), None),
    ((5, 3, 700), None),  # short planes summed 2 at a time: a last group of 1
    ((5, 1), None),
    ((3, 5, 6, 7), None),
    ((3, 5, 6, 7), CL),
    ((4, 3, 1, 1), None),
    ((2, 5, 3, 4, 5), None),
    ((2, 5, 3, 4, 5), CL3),
]
SHAPE_IDS = [f"{s}{'-cl' if f else ''}" for s, f in SHAPES]


def _module_cls(ndim, fused):
    d = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    return getattr(fused_norm, f"FusedBatchNorm{d}d") if fused else getattr(nn, f"BatchNorm{d}d")


def _make(shape, dtype, wdtype, device, fmt=None, steps=3, seed=0, **kwargs):
    """torch's module, ours (same state) and a float64 reference, plus `steps` inputs and a grad."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    theirs = _module_cls(len(shape), False)(C, device=device, dtype=wdtype, **kwargs)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.copy_(torch.randn(C, generator=g))
            theirs.bias.copy_(torch.randn(C, generator=g))
    ours = _module_cls(len(shape), True)(C, device=device, dtype=wdtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    ref = _module_cls(len(shape), False)(C, device=device, dtype=torch.float64, **kwargs)
    ref.load_state_dict(theirs.state_dict())

    def one():
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        x = x.to(device=device, dtype=dtype)
        return x.contiguous(memory_format=fmt) if fmt is not None else x

    xs = [one() for _ in range(steps)]
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return theirs, ours, ref, xs, dy


def _steps(module, xs, dy, to=None):
    """Runs every x (the last one with a backward) and returns y, dx, dweight, dbias."""
    for x in xs[:-1]:
        module(x if to is None else x.to(to))
    x = (xs[-1] if to is None else xs[-1].to(to)).detach().requires_grad_()
    y = module(x)
    y.backward(dy if to is None else dy.to(to))
    grads = [module.weight.grad, module.bias.grad] if module.affine else [None, None]
    return [y.detach(), x.grad] + grads


def _compare(ours, theirs, ref, dtype, wdtype, names=("y", "dx", "dweight", "dbias")):
    for name, o, t, r in zip(names, ours, theirs, ref):
        if r is None:
            assert o is None and t is None, name
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, (name, o.dtype, t.dtype, o.shape, t.shape)
        assert_accurate(o, t, r, dtype if name in ("y", "dx") else wdtype, name)


def _compare_buffers(ours, theirs, ref, wdtype):
    if theirs.running_mean is None:
        assert ours.running_mean is None and ours.running_var is None and ours.num_batches_tracked is None
        return
    _compare([ours.running_mean, ours.running_var], [theirs.running_mean, theirs.running_var],
             [ref.running_mean, ref.running_var], wdtype, wdtype, ("running_mean", "running_var"))
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def _check_module(theirs, ours, ref, xs, dy, dtype, wdtype):
    """Training steps then eval, outputs, gradients, buffers and strides against torch."""
    for m in (theirs, ours, ref):
        m.train()
    out = [_steps(ours, xs, dy), _steps(theirs, xs, dy), _steps(ref, xs, dy, torch.float64)]
    assert out[0][0].stride() == out[1][0].stride() and out[0][1].stride() == out[1][1].stride()
    _compare(*out, dtype, wdtype)
    _compare_buffers(ours, theirs, ref, wdtype)
    # Eval from the same running statistics (fp16/bf16 buffers round differently).
    ours.load_state_dict(theirs.state_dict())
    ref.load_state_dict(theirs.state_dict())
    for m in (theirs, ours, ref):
        m.eval()
        m.zero_grad()
    out = [_steps(ours, xs[-1:], dy), _steps(theirs, xs[-1:], dy), _steps(ref, xs[-1:], dy, torch.float64)]
    _compare(*out, dtype, wdtype)


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,fmt", SHAPES, ids=SHAPE_IDS)
def test_matches_torch(device, shape, fmt, dtype, wdtype):
    _check_module(*_make(shape, dtype, wdtype, device, fmt), dtype, wdtype)


@pytest.mark.parametrize("cpu_capability", cpu_capabilities(), indirect=True)
@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[2], DTYPES[5]], ids=["fp32", "bf16", "fp16+fp32w"])
@pytest.mark.parametrize("shape,fmt", [((6, 35), None), ((3, 7, 2100), None), ((3, 7, 5, 6), CL)],
                         ids=["NC", "NCL", "NHWC"])
def test_every_cpu_isa(cpu_capability, shape, fmt, dtype, wdtype):
    _check_module(*_make(shape, dtype, wdtype, "cpu", fmt), dtype, wdtype)


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None], ids=["0.1", "0", "1", "None"])
@pytest.mark.parametrize("shape,fmt", [((6, 4), None), ((3, 4, 5, 6), CL)], ids=["NC", "NHWC"])
def test_momentum(device, shape, fmt, momentum):
    _check_module(*_make(shape, torch.float32, torch.float32, device, fmt, steps=4, momentum=momentum),
                  torch.float32, torch.float32)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["0.1", "None"])
@pytest.mark.parametrize("kwargs", [dict(affine=False), dict(track_running_stats=False),
                                    dict(affine=False, track_running_stats=False)],
                         ids=["no_affine", "no_track", "neither"])
def test_module_options(device, kwargs, momentum):
    _check_module(*_make((4, 3, 5, 6), torch.float32, torch.float32, device, momentum=momentum, **kwargs),
                  torch.float32, torch.float32)


@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[4]], ids=["fp32", "bf16+fp32w"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stats", [True, False], ids=["stats", "no_stats"])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=["wb", "w", "none"])
def test_functional(device, affine, stats, training, dtype, wdtype):
    if not training and not stats:
        pytest.skip("eval needs running statistics (an error case)")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 9, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(6, 4, 9, generator=g).to(device=device, dtype=dtype)
    params = [torch.randn(4, generator=g).to(device=device, dtype=wdtype) if a else None for a in affine]
    rm = torch.randn(4, generator=g).to(device=device, dtype=wdtype) if stats else None
    rv = torch.rand(4, generator=g).to(device=device, dtype=wdtype) + 0.5 if stats else None
    results = []
    for fn, cast in ((fused_norm.batch_norm, None), (F.batch_norm, None), (F.batch_norm, torch.float64)):
        c = (lambda t: t) if cast is None else (lambda t: t.to(cast) if t is not None else None)  # noqa: E731
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in [c(x)] + [c(p) for p in params]]
        bufs = [c(t).clone() if t is not None else None for t in (rm, rv)]
        y = fn(leaves[0], bufs[0], bufs[1], leaves[1], leaves[2], training=training, momentum=0.3, eps=1e-3)
        y.backward(c(dy))
        results.append(([y.detach()] + [t.grad if t is not None else None for t in leaves], bufs))
    (ours, ob), (theirs, tb), (ref, rb) = results
    _compare(ours, theirs, ref, dtype, wdtype)
    if stats:
        _compare(ob, tb, rb, wdtype, wdtype, ("running_mean", "running_var"))
        if not training:
            assert torch.equal(ob[0], rm) and torch.equal(ob[1], rv)


def test_memory_formats_of_outputs(device):
    """The output and dx keep torch's memory format; other layouts are copied once."""
    cases = [  # (base, view of it)
        (torch.randn(4, 6, 5, 3).contiguous(memory_format=CL), lambda t: t),
        (torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=CL3), lambda t: t),
        (torch.randn(4, 5, 6), lambda t: t.transpose(1, 2)),  # (N, C, L) stored as (N, L, C)
        (torch.randn(4, 6, 1, 1).contiguous(memory_format=CL), lambda t: t),
        (torch.randn(1, 6, 5, 3).contiguous(memory_format=CL), lambda t: t),
        (torch.randn(8, 12, 10), lambda t: t[::2, ::2, 1:]),
        (torch.randn(5, 7, 3), lambda t: t.expand(2, 5, 7, 3)),
    ]
    for base, view in cases:
        results = []
        for fn in (F.batch_norm, fused_norm.batch_norm):
            leaf = base.detach().to(device).clone(memory_format=torch.preserve_format).requires_grad_()
            y = fn(view(leaf), None, None, training=True)
            y.backward(torch.arange(y.numel(), device=device, dtype=y.dtype).reshape(y.shape).sin())
            results.append((y, leaf.grad))
        (ya, ga), (yb, gb) = results
        assert yb.stride() == ya.stride() and gb.stride() == ga.stride(), (view(base).shape, view(base).stride())
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(gb, ga)


@pytest.mark.no_kernels
def test_empty_input(device):
    for shape in ((0, 3, 4), (0, 3), (2, 3, 0)):
        theirs, ours, ref, xs, dy = _make(shape, torch.float32, torch.float32, device, steps=2)
        _check_module(theirs, ours, ref, xs, dy, torch.float32, torch.float32)
        assert torch.equal(ours.running_mean, torch.zeros(3, device=device))
        assert ours.num_batches_tracked.item() == 2
        assert torch.equal(ours.weight.grad, torch.zeros(3, device=device))
    x = torch.randn(3, 0, 4, device=device, requires_grad=True)
    y = fused_norm.batch_norm(x, None, None, training=True)
    assert y.shape == (3, 0, 4) and y.grad_fn is not None


# Planes and rows of channels (narrow and wide), with the inf first in its channel (the
# value statistics may shift by), inside it, and a NaN.
@pytest.mark.parametrize("shape,fmt", [((3, 4, 5, 6), None), ((3, 4, 40, 40), None), ((3, 4, 5, 6), CL),
                                       ((300, 1100), None)], ids=["NCHW", "NCHW-long", "NHWC", "NC-wide"])
def test_nan_inf_stay_in_their_channel_like_torch(device, shape, fmt):
    x = torch.randn(shape, device=device)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x[(0, 0) + (0,) * (x.dim() - 2)] = float("inf")
    x[(1, 1) + (2,) * (x.dim() - 2)] = float("-inf")
    x[(2, 2) + (1,) * (x.dim() - 2)] = float("nan")
    results = []
    for f in (F.batch_norm, fused_norm.batch_norm):
        rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        results.append((f(x, rm, rv, training=True), rm, rv))
    (y_ref, m_ref, v_ref), (y, m, v) = results
    torch.testing.assert_close(m, m_ref, equal_nan=True)
    torch.testing.assert_close(v, v_ref, equal_nan=True)
    assert y[:, :3].isnan().all()
    torch.testing.assert_close(y[:, 3:], y_ref[:, 3:])


# Statistics of channels whose mean is far from zero against their spread (raw pixel
# values, a shifted activation), with the first value of each channel at 4 standard
# deviations (statistics may shift by it), over every kernel layout and long reductions.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape,fmt", [((300, 2100), None), ((1000, 7), None), ((4, 3, 2100), None),
                                       ((8, 16, 20, 20), None), ((8, 16, 20, 20), CL)],
                         ids=["NC-wide", "NC-narrow", "NCL", "NCHW", "NHWC"])
def test_offset_data_like_torch(device, shape, fmt, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 200
    x[0] += 4
    x = x.to(device=device, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    out = []
    for f, xi, dyi in ((fused_norm.batch_norm, x, dy), (F.batch_norm, x, dy), (F.batch_norm, x.double(), dy.double())):
        xi = xi.detach().requires_grad_()
        rm = torch.zeros(shape[1], device=device, dtype=torch.float64 if xi.dtype == torch.float64 else torch.float32)
        rv = torch.ones_like(rm)
        y = f(xi, rm, rv, training=True, momentum=1.0)
        y.backward(dyi)
        out.append((y.detach(), xi.grad, rm, rv))
    for name, ours, theirs, ref in zip(("y", "dx", "running_mean", "running_var"), *out):
        assert_accurate(ours, theirs, ref, dtype if name in ("y", "dx") else theirs.dtype, name)


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["wb", "w", "b", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_of_any_subset(device, affine, training):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(3, generator=g, dtype=torch.float64).to(device) if affine[0] else None
    b = torch.randn(3, generator=g, dtype=torch.float64).to(device) if affine[1] else None
    dy = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(device)
    rm = torch.randn(3, generator=g, dtype=torch.float64).to(device)
    rv = torch.rand(3, generator=g, dtype=torch.float64).to(device) + 0.5
    assert_gradients_of_every_subset(fused_norm.batch_norm, F.batch_norm,
                                     lambda fn, x, w, b: fn(x, rm.clone(), rv.clone(), w, b, training), x, w, b, dy)


def test_gradcheck_and_gradgradcheck(device):
    for shape, fmt in (((4, 3), None), ((3, 2, 5), None), ((2, 3, 2, 3), CL)):
        for training in (True, False):
            x = torch.randn(shape, dtype=torch.float64, device=device)
            x = (x.contiguous(memory_format=fmt) if fmt else x).requires_grad_()
            w = torch.randn(shape[1], dtype=torch.float64, device=device, requires_grad=True)
            b = torch.randn(shape[1], dtype=torch.float64, device=device, requires_grad=True)
            rm = torch.randn(shape[1], dtype=torch.float64, device=device)
            rv = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
            fn = lambda x, w, b: fused_norm.batch_norm(x, rm.clone(), rv.clone(), w, b, training)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x, w, b))
            assert torch.autograd.gradgradcheck(fn, (x, w, b))
            fn = lambda x: fused_norm.batch_norm(x, rm.clone(), rv.clone(), None, None, training)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,))
            assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[4]], ids=["fp32", "bf16+fp32w"])
def test_opcheck(device, dtype, wdtype):
    C = 4
    nbt = torch.tensor(3, device=device)
    for shape, fmt in (((3, C, 10), None), ((3, C, 2, 5), CL), ((8, C), None)):
        x = torch.randn(shape, device=device).to(dtype)
        x = (x.contiguous(memory_format=fmt) if fmt else x).requires_grad_()
        w = torch.randn(C, device=device, dtype=wdtype, requires_grad=True)
        b = torch.randn(C, device=device, dtype=wdtype, requires_grad=True)
        rm = torch.randn(C, device=device, dtype=wdtype)
        rv = torch.rand(C, device=device, dtype=wdtype) + 0.5
        for args in ((x, w, b, rm, rv, None, True, 0.1, 1e-5), (x, w, None, rm, rv, nbt, True, None, 1e-5),
                     (x, None, b, None, None, None, True, 0.1, 1e-3), (x, w, b, rm, rv, None, False, 0.1, 1e-5)):
            torch.library.opcheck(ops.batch_norm_fwd, args)
            _, mean, invstd = ops.batch_norm_fwd(*args)
            dy = torch.randn_like(x.detach())
            torch.library.opcheck(ops.batch_norm_bwd, (dy, x.detach(), args[1], args[2], mean, invstd, args[6]))


def test_deterministic(device):
    for shape, fmt in (((16, 64, 700), None), ((8, 96, 20, 30), CL), ((3000, 96), None)):
        theirs, ours, ref, xs, dy = _make(shape, torch.float32, torch.float32, device, fmt, steps=1)
        second = copy.deepcopy(ours)
        first = _steps(ours, xs, dy)
        again = _steps(second, xs, dy)
        for a, c in zip(first + [ours.running_mean, ours.running_var],
                        again + [second.running_mean, second.running_var]):
            assert torch.equal(a, c)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[1], DTYPES[4]], ids=["fp32", "fp64", "bf16+fp32w"])
@pytest.mark.parametrize("shape", [(2, 320, 80, 80), (128, 640, 7, 7), (4, 512, 2100)],
                         ids=["planes", "short-planes", "long-planes"])
def test_channel_blocks_equal_two_passes(shape, dtype, wdtype, threads):
    """On CPU, a large NCHW / (N, C, L) training forward and backward run in blocks of
    channels, each read once from memory (batch_norm_impl.h, ChannelBlocks: each thread
    sums a block while it normalizes the one before, except for short planes); inputs
    below the streaming threshold run the reduction and the elementwise pass as two passes
    over the whole tensor. Both must give the same bits. Every shape and dtype here has at
    least 16 blocks of 512 KiB per input, the 8 per thread that the block path needs with
    two threads; with (4, 512, 2100) the last block has fewer channels than the others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 2
    dy = torch.randn(shape, generator=g, dtype=dtype)
    C = shape[1]
    w, b = (torch.randn(C, generator=g, dtype=wdtype) for _ in range(2))
    outs = []
    saved_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for threshold in (1 << 62, 0):  # two passes, then blocks
            fused_norm._C.set_stream_threshold(threshold)
            rm, rv = torch.zeros(C, dtype=wdtype), torch.ones(C, dtype=wdtype)
            fwd = ops.batch_norm_fwd(x, w, b, rm, rv, None, True, 0.1, 1e-5)
            outs.append([*fwd, rm, rv, *ops.batch_norm_bwd(dy, x, w, b, fwd[1], fwd[2], True)])
    finally:
        fused_norm._C.set_stream_threshold(-1)
        torch.set_num_threads(saved_threads)
    for two_passes, blocks in zip(*outs):
        assert torch.equal(two_passes, blocks)


class _ConvNet(nn.Module):
    def __init__(self, fused, momentum):
        super().__init__()
        bn2d = fused_norm.FusedBatchNorm2d if fused else nn.BatchNorm2d
        bn1d = fused_norm.FusedBatchNorm1d if fused else nn.BatchNorm1d
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn2d(8, momentum=momentum)
        self.fc = nn.Linear(8, 6)
        self.bn1 = bn1d(6, momentum=momentum)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.bn1(self.fc(h.mean((2, 3))))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["0.1", "None"])
def test_compile_matches_eager(device, momentum):
    """fullgraph compile in training (several steps) and in eval against eager: outputs,
    gradients, running statistics and num_batches_tracked."""
    torch.manual_seed(0)
    eager = _ConvNet(True, momentum).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, device=device).contiguous(memory_format=CL)
        target = torch.randn(4, 6, device=device)
        outs = []
        for m in (eager, compiled):
            for p in m.parameters():
                p.grad = None
            y = m(x)
            (y * target).sum().backward()
            outs.append([y.detach()] + [p.grad for p in m.parameters()])
        for a, c in zip(*outs):  # inductor's conv/relu/mean code rounds differently
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    for a, c in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    assert compiled_model.bn.num_batches_tracked.item() == 3
    eager.eval()
    compiled_model.eval()
    x = torch.randn(4, 3, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), eager(x))


def test_matches_torch_module_training_across_steps_with_none_momentum(device):
    """The fused module tracks torch's cumulative average exactly like nn.BatchNorm2d."""
    torch.manual_seed(0)
    theirs = _ConvNet(False, None).to(device)
    ours = _ConvNet(True, None).to(device)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, device=device)
        torch.testing.assert_close(ours(x), theirs(x))
    for (name, a), c in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(a, c, msg=name)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_module_is_a_batchnorm_and_checkpoints_both_ways(d):
    ours = getattr(fused_norm, f"FusedBatchNorm{d}d")(5, eps=1e-3, momentum=0.2)
    theirs = getattr(nn, f"BatchNorm{d}d")(5, eps=1e-3, momentum=0.2)
    assert isinstance(ours, type(theirs))
    assert repr(ours) == "Fused" + repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    shape = (4, 5) + (3,) * (d if d > 1 else 1)
    theirs(torch.randn(shape))
    ours.load_state_dict(theirs.state_dict())
    back = getattr(nn, f"BatchNorm{d}d")(5, eps=1e-3, momentum=0.2)
    back.load_state_dict(ours.state_dict())
    for m in (ours, theirs, back):
        m.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(back(x), theirs(x))
    assert back.num_batches_tracked.item() == 1

    # A checkpoint from before num_batches_tracked existed (version 1) still loads.
    old = theirs.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    fresh = getattr(fused_norm, f"FusedBatchNorm{d}d")(5)
    fresh.load_state_dict(old)
    assert fresh.num_batches_tracked.item() == 0
    torch.testing.assert_close(fresh.running_mean, theirs.running_mean)

    untracked = getattr(fused_norm, f"FusedBatchNorm{d}d")(5, track_running_stats=False, affine=False)
    assert list(untracked.state_dict()) == []


def _bad_args():
    x = torch.randn(4, 3, 5)
    c3, c4 = torch.ones(3), torch.ones(4)
    return [
        ((torch.randn(1, 3), None, None), dict(training=True)),
        ((torch.randn(1, 3, 1, 1), c3, c3), dict(training=True)),
        ((x, c4, c3), dict(training=True)),
        ((x, c3, c4), dict(training=False)),
        ((x, None, None, c4), dict(training=True)),
        ((x, None, None, None, c4), dict(training=True)),
        ((x, c3, None), dict(training=True)),
        ((x, None, None), dict(training=False)),
        ((torch.ones(4, 3, dtype=torch.long), None, None), dict(training=True)),
        ((torch.randn(3), c3, c3), dict(training=False)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_args())))
def test_errors_like_torch(case):
    args, kwargs = _bad_args()[case]
    raises_like_torch(lambda: fused_norm.batch_norm(*args, **kwargs), lambda: F.batch_norm(*args, **kwargs))


@pytest.mark.parametrize("d,ndim", [(1, 1), (1, 4), (2, 3), (2, 5), (3, 4), (3, 6)])
def test_module_dimension_errors(d, ndim):
    x = torch.randn((2, 3, 2, 2, 2, 2)[:ndim])
    raises_like_torch(lambda: getattr(fused_norm, f"FusedBatchNorm{d}d")(3)(x),
                       lambda: getattr(nn, f"BatchNorm{d}d")(3)(x))


def test_batch_of_one_module_error():
    x = torch.randn(1, 3)
    raises_like_torch(lambda: fused_norm.FusedBatchNorm1d(3)(x), lambda: nn.BatchNorm1d(3)(x))
    fused_norm.FusedBatchNorm1d(3).eval()(x)  # fine in eval


DT = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("xdt", DT, ids=[str(d)[6:] for d in DT])
def test_mixed_dtypes_like_torch(xdt, training):
    """Every (input, parameter, buffer) dtype combination: accepted or rejected as torch does."""
    for wdt in DT + [None]:
        for rdt in DT:
            x = torch.randn(4, 3, 5, dtype=xdt)
            w = torch.ones(3, dtype=wdt) if wdt else None
            b = torch.zeros(3, dtype=wdt) if wdt else None
            args = (x, torch.zeros(3, dtype=rdt), torch.ones(3, dtype=rdt), w, b, training)
            try:
                expected = F.batch_norm(*args)
            except RuntimeError:
                raises_like_torch(lambda: fused_norm.batch_norm(*args), lambda: F.batch_norm(*args))
                continue
            got = fused_norm.batch_norm(*args)
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
