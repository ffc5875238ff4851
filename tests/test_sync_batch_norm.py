"""FusedSyncBatchNorm and the ops it is built from (batch_norm_stats, batch_norm_bwd_reduce,
batch_norm_bwd_elemt).

The distributed tests start 2 processes once per backend (gloo on CPU; NCCL on 2 GPUs when
present), run every scenario below in both, and compare what each rank saw with a single
process running torch.nn.BatchNorm on the concatenated batch. A hang fails the tests after
_TIMEOUT_S seconds instead of blocking."""

import copy
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_norm
from conftest import CUDA_OK, assert_close_to_reference, cpu_capabilities
from conftest import DTYPE_IDS as ALL_DTYPE_IDS
from conftest import DTYPES as ALL_DTYPES

ops = torch.ops.fused_norm
CL, CL3 = torch.channels_last, torch.channels_last_3d


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dims(x):
    return [0] + list(range(2, x.dim()))


# ---------------------------------------------------------------------------------------
# The ops, in one process
# ---------------------------------------------------------------------------------------

# conftest's dtype pairs without fp16 + fp32 parameters.
DTYPES, DTYPE_IDS = ALL_DTYPES[:5], ALL_DTYPE_IDS[:5]
# Every kernel layout: (N, C), (N, C, L) planes, one channel, NCHW, channels_last,
# NCDHW and channels_last_3d, runs longer than a block.
SHAPES = [
    ((9, 5), None),
    ((4, 5, 7), None),
    ((2, 3, 4100), None),
    ((2, 1, 3000), None),
    ((3, 5, 6, 7), None),
    ((3, 5, 6, 7), CL),
    ((2, 5, 3, 4, 5), None),
    ((2, 5, 3, 4, 5), CL3),
]
SHAPE_IDS = [f"{s}{'-cl' if f else ''}" for s, f in SHAPES]


def _input(shape, fmt, dtype, device, seed=0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


@pytest.mark.parametrize("dtype", [d for d, w in DTYPES if d == w], ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("shape,fmt", SHAPES, ids=SHAPE_IDS)
def test_stats(device, shape, fmt, dtype):
    """batch_norm_stats: the mean and biased variance of every channel, as accurate as
    torch.var_mean in the stat dtype (against float64); the mean bitwise batch_norm_fwd's."""
    x = _input(shape, fmt, dtype, device, offset=100.0)  # a large mean: a naive sum of squares would fail
    mean, var = ops.batch_norm_stats(x)
    assert mean.dtype == var.dtype == _stat(dtype) and mean.shape == var.shape == (shape[1],)
    theirs_var, theirs_mean = torch.var_mean(x.to(_stat(dtype)), _dims(x), correction=0)
    ref_var, ref_mean = torch.var_mean(x.double(), _dims(x), correction=0)
    assert_close_to_reference(mean.cpu(), theirs_mean.cpu(), ref_mean.cpu(), _stat(dtype), "mean")
    assert_close_to_reference(var.cpu(), theirs_var.cpu(), ref_var.cpu(), _stat(dtype), "var")
    _, save_mean, _ = ops.batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5)
    assert torch.equal(mean, save_mean)


def _phases_vs_bwd(shape, fmt, dtype, wdtype, device):
    """batch_norm_bwd_reduce + batch_norm_bwd_elemt with the local count against
    batch_norm_bwd, which runs the same phases with its sums kept in double."""
    x = _input(shape, fmt, dtype, device)
    dy = _input(shape, fmt, dtype, device, seed=1, offset=0.0)
    C = shape[1]
    w = torch.randn(C, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, wdtype)
    _, mean, invstd = ops.batch_norm_fwd(x, w, w, None, None, None, True, 0.1, 1e-5)
    sum_dy, sum_dy_xmu = ops.batch_norm_bwd_reduce(dy, x, mean)
    assert sum_dy.dtype == sum_dy_xmu.dtype == _stat(dtype) and sum_dy.shape == (C,)
    count = torch.tensor([x.numel() // C], device=device)
    dx = ops.batch_norm_bwd_elemt(dy, x, w, mean, invstd, sum_dy, sum_dy_xmu, count)
    ref_dx, dweight, dbias = ops.batch_norm_bwd(dy, x, w, w, mean, invstd, True)
    assert dx.dtype == dtype and dx.stride() == ref_dx.stride()
    # dbias is sum_dy rounded to the weight's dtype, through the same reduction.
    assert torch.equal(sum_dy.to(wdtype), dbias)
    torch.testing.assert_close((sum_dy_xmu * invstd).to(wdtype), dweight)
    if dtype == torch.float64:
        assert torch.equal(dx, ref_dx)
    else:  # the sums were rounded to float once
        torch.testing.assert_close(dx, ref_dx, rtol=torch.finfo(dtype).eps * 4, atol=torch.finfo(dtype).eps * 4)
    # Sums against float64 torch.
    xd, dyd = x.double(), dy.double()
    ref_sum_dy = dyd.sum(_dims(x))
    ref_sum_dy_xmu = (dyd * (xd - mean.double().view([1, -1] + [1] * (x.dim() - 2)))).sum(_dims(x))
    scale = dyd.abs().sum(_dims(x)) * (xd.abs().amax() + 1)
    assert ((sum_dy.double() - ref_sum_dy).abs() <= 1e-6 * scale).all()
    assert ((sum_dy_xmu.double() - ref_sum_dy_xmu).abs() <= 1e-6 * scale).all()


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,fmt", SHAPES, ids=SHAPE_IDS)
def test_backward_phases(device, shape, fmt, dtype, wdtype):
    _phases_vs_bwd(shape, fmt, dtype, wdtype, device)


@pytest.mark.parametrize("cpu_capability", cpu_capabilities(), indirect=True)
@pytest.mark.parametrize("shape,fmt", [((6, 35), None), ((3, 7, 2100), None), ((3, 7, 5, 6), CL)],
                         ids=["NC", "NCL", "NHWC"])
def test_phases_every_cpu_isa(cpu_capability, shape, fmt):
    _phases_vs_bwd(shape, fmt, torch.bfloat16, torch.float32, "cpu")
    x = _input(shape, fmt, torch.float32, "cpu")
    _, save_mean, _ = ops.batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5)
    assert torch.equal(ops.batch_norm_stats(x)[0], save_mean)


def test_elemt_uses_the_given_count(device):
    """dx over a larger (global) count than the local batch: torch's formula with n = count."""
    x, dy = _input((4, 3, 5), None, torch.float64, device), _input((4, 3, 5), None, torch.float64, device, seed=1)
    g = torch.Generator().manual_seed(3)
    w, mean, sum_dy, sum_dy_xmu = (torch.randn(3, generator=g, dtype=torch.float64).to(device) for _ in range(4))
    invstd = torch.rand(3, generator=g, dtype=torch.float64).to(device) + 0.5
    dx = ops.batch_norm_bwd_elemt(dy, x, w, mean, invstd, sum_dy, sum_dy_xmu, torch.tensor([57], device=device))
    v = lambda t: t.view(1, 3, 1)  # noqa: E731
    ref = (dy - v(sum_dy) / 57 - (x - v(mean)) * v(invstd) ** 2 * v(sum_dy_xmu) / 57) * v(invstd * w)
    torch.testing.assert_close(dx, ref, rtol=1e-13, atol=1e-13)
    dx = ops.batch_norm_bwd_elemt(dy, x, None, mean, invstd, sum_dy, sum_dy_xmu, torch.tensor([57], device=device))
    torch.testing.assert_close(dx, ref / v(w), rtol=1e-13, atol=1e-13)


@pytest.mark.no_kernels
def test_empty_and_bad_arguments(device):
    x = torch.randn(0, 3, 4, device=device)
    mean, var = ops.batch_norm_stats(x)
    assert mean.shape == (3,) and mean.isnan().all() and var.isnan().all()
    s, sx = ops.batch_norm_bwd_reduce(x, x, torch.zeros(3, device=device))
    assert torch.equal(s, torch.zeros(3, device=device)) and torch.equal(sx, torch.zeros(3, device=device))
    c3 = torch.ones(3, device=device)
    count = torch.tensor([5], device=device)
    assert ops.batch_norm_bwd_elemt(x, x, c3, c3, c3, c3, c3, count).shape == (0, 3, 4)

    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(IndexError):
        ops.batch_norm_stats(torch.randn(3, device=device))
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        ops.batch_norm_stats(x.long())
    with pytest.raises(RuntimeError, match="mean must hold one Float per channel"):
        ops.batch_norm_bwd_reduce(x, x, torch.zeros(4, device=device))
    with pytest.raises(RuntimeError, match="mean must hold one Float per channel"):
        ops.batch_norm_bwd_reduce(x, x, torch.zeros(3, device=device, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_out must match input"):
        ops.batch_norm_bwd_reduce(x[:1], x, c3)
    with pytest.raises(RuntimeError, match="count must be a one-element int64 tensor"):
        ops.batch_norm_bwd_elemt(x, x, c3, c3, c3, c3, c3, torch.tensor([5.0], device=device))
    with pytest.raises(RuntimeError, match="count must be a one-element int64 tensor"):
        ops.batch_norm_bwd_elemt(x, x, c3, c3, c3, c3, c3, torch.tensor([5, 5], device=device))
    with pytest.raises(RuntimeError, match="sum_dy_xmu must hold one Float per channel"):
        ops.batch_norm_bwd_elemt(x, x, c3, c3, c3, c3, torch.ones(2, device=device), count)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 2"):
        ops.batch_norm_bwd_elemt(x, x, torch.ones(2, device=device), c3, c3, c3, c3, count)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        ops.batch_norm_bwd_elemt(x, x, c3.double(), c3, c3, c3, c3, count)


def _op_args(shape, fmt, dtype, wdtype, device):
    x = _input(shape, fmt, dtype, device)
    dy = _input(shape, fmt, dtype, device, seed=1)
    C = shape[1]
    g = torch.Generator().manual_seed(4)
    w = torch.randn(C, generator=g).to(device, wdtype)
    mean, invstd, sum_dy, sum_dy_xmu = (torch.randn(C, generator=g).to(device, _stat(dtype)) for _ in range(4))
    count = torch.tensor([3 * x.numel() // C], device=device)
    return x, dy, w, mean, invstd.abs() + 0.5, sum_dy, sum_dy_xmu, count


@pytest.mark.parametrize("dtype,wdtype,grad", [DTYPES[0] + (False,), DTYPES[4] + (False,), DTYPES[0] + (True,)],
                         ids=["fp32", "bf16+fp32w", "fp32-grad"])
def test_opcheck(device, dtype, wdtype, grad):
    """Schemas, fake kernels (strides included) and autograd registration (with inputs that
    require grad: the autograd formulas under aot_autograd)."""
    for shape, fmt in (((3, 4, 2, 5), CL),) if grad else (((3, 4, 10), None), ((3, 4, 2, 5), CL), ((8, 4), None)):
        x, dy, w, mean, invstd, sum_dy, sum_dy_xmu, count = _op_args(shape, fmt, dtype, wdtype, device)
        if grad:
            for t in (x, dy, w, mean, invstd, sum_dy, sum_dy_xmu):
                t.requires_grad_()
        torch.library.opcheck(ops.batch_norm_stats, (x,))
        torch.library.opcheck(ops.batch_norm_bwd_reduce, (dy, x, mean))
        for weight in (w, None):
            torch.library.opcheck(ops.batch_norm_bwd_elemt, (dy, x, weight, mean, invstd, sum_dy, sum_dy_xmu, count))


def test_gradcheck(device):
    """The ops' autograd formulas (differentiated torch-op forms of the kernels), first and
    second order, in float64."""
    for shape, fmt in (((5, 3), None), ((3, 2, 5), None), ((2, 3, 2, 3), CL)):
        *args, count = _op_args(shape, fmt, torch.float64, torch.float64, device)
        x, dy, w, mean, invstd, sum_dy, sum_dy_xmu = (t.requires_grad_() for t in args)
        sums = (sum_dy, sum_dy_xmu)
        for fn, inputs in ((ops.batch_norm_stats, (x,)),
                           (ops.batch_norm_bwd_reduce, (dy, x, mean)),
                           (lambda *a: ops.batch_norm_bwd_elemt(*a, count), (dy, x, w, mean, invstd) + sums),
                           (lambda *a: ops.batch_norm_bwd_elemt(dy, a[0], None, *a[1:], count),
                            (x, mean, invstd) + sums)):
            assert torch.autograd.gradcheck(fn, inputs)
            assert torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------
# The module, in one process
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["0.1", "None"])
@pytest.mark.parametrize("shape,fmt", [((6, 4), None), ((3, 4, 5, 6), CL), ((2, 4, 3, 2, 5), None)],
                         ids=["NC", "NHWC", "NCDHW"])
def test_without_process_group_it_is_fused_batch_norm(device, shape, fmt, momentum):
    """No torch.distributed: every output, gradient and buffer bitwise FusedBatchNorm's,
    in training and eval."""
    assert not (dist.is_available() and dist.is_initialized())
    cls = {2: fused_norm.FusedBatchNorm1d, 4: fused_norm.FusedBatchNorm2d, 5: fused_norm.FusedBatchNorm3d}[len(shape)]
    plain = cls(4, momentum=momentum, device=device)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    sync = fused_norm.FusedSyncBatchNorm(4, momentum=momentum, device=device)
    sync.load_state_dict(plain.state_dict())
    for training in (True, True, False):
        x = _input(shape, fmt, torch.float32, device, seed=len(shape))
        dy = torch.randn(shape, device=device)
        outs = []
        for m in (plain, sync):
            m.train(training)
            m.zero_grad()
            leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            y = m(leaf)
            y.backward(dy)
            outs.append([y, leaf.grad, m.weight.grad, m.bias.grad])
        for a, b in zip(*outs):
            assert torch.equal(a, b) and a.stride() == b.stride()
        for a, b in zip(plain.buffers(), sync.buffers()):
            assert torch.equal(a, b)


def test_module_is_a_sync_batch_norm():
    ours = fused_norm.FusedSyncBatchNorm(5, eps=1e-3, momentum=0.2)
    theirs = nn.SyncBatchNorm(5, eps=1e-3, momentum=0.2)
    assert isinstance(ours, nn.SyncBatchNorm)
    assert repr(ours) == "Fused" + repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(fused_norm.FusedBatchNorm2d(5).state_dict())
    nn.BatchNorm2d(5).load_state_dict(ours.state_dict())
    no_bias = fused_norm.FusedSyncBatchNorm(5, bias=False)
    assert no_bias.bias is None and no_bias.weight is not None
    assert list(fused_norm.FusedSyncBatchNorm(5, affine=False, track_running_stats=False).state_dict()) == []
    # torch.nn.SyncBatchNorm's input checks, which come before its device check.
    for x in (torch.randn(5), torch.randn(4, 0, 3)):
        with pytest.raises(ValueError) as expected:
            theirs(x)
        with pytest.raises(ValueError) as got:
            ours(x)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(1, 5))


class _Net(nn.Module):
    """Torch's and fused_norm's BatchNorm layers, nested, for convert_sync_batchnorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm1d(3)
        self.b = nn.Sequential(nn.Conv2d(3, 3, 1), fused_norm.FusedBatchNorm2d(3, momentum=None))
        self.c = fused_norm.FusedBatchNorm1d(3, affine=False)
        self.d = nn.BatchNorm3d(3, track_running_stats=False, eps=1e-3)
        self.e = fused_norm.FusedBatchNorm3d(3, bias=False)
        self.f = nn.BatchNorm2d(3, dtype=torch.float64)


def test_convert_sync_batchnorm():
    net = _Net()
    net.b[1].eval()
    net.a.qconfig = "marker"
    group = object()  # stored as given, as torch does
    before = {name: m for name, m in net.named_modules()}
    tensors = {name: t for name, t in list(net.named_parameters()) + list(net.named_buffers())}
    out = fused_norm.FusedSyncBatchNorm.convert_sync_batchnorm(net, group)
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(_Net()))
    assert out is net
    for name, m in out.named_modules():
        if isinstance(before[name], nn.modules.batchnorm._BatchNorm):
            old, ref = before[name], dict(theirs.named_modules())[name]
            assert type(m) is fused_norm.FusedSyncBatchNorm and m.process_group is group
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(m, attr) == getattr(old, attr) == getattr(ref, attr), (name, attr)
            assert m.training == old.training
            assert list(m.state_dict()) == list(ref.state_dict())
        else:
            assert type(m) is type(before[name])
    # The same Parameter and buffer objects (an optimizer built before keeps working).
    after = {name: t for name, t in list(out.named_parameters()) + list(out.named_buffers())}
    assert after.keys() == tensors.keys()
    for name, t in tensors.items():
        assert after[name] is t, name
    assert not any(t.is_meta for t in after.values())
    assert out.f.running_mean.dtype == torch.float64
    assert out.a.qconfig == "marker"
    assert out.e.bias is None
    # A BatchNorm module itself comes back as a new layer.
    bn = nn.BatchNorm2d(4)
    new = fused_norm.FusedSyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(new) is fused_norm.FusedSyncBatchNorm and new.weight is bn.weight and new.process_group is None


# ---------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------

_TIMEOUT_S = 150  # all scenarios of one backend; a normal run takes a fraction of it

# Per-rank batch sizes, per-sample shape, memory format, dtypes, module options.
_SPECS = {
    "even": dict(sizes=(3, 3), tail=(4, 5, 6)),
    "uneven": dict(sizes=(5, 2), tail=(4, 5, 6)),
    "empty_rank": dict(sizes=(4, 0), tail=(4, 5, 6)),
    "all_empty": dict(sizes=(0, 0), tail=(4, 5, 6)),
    "momentum_none": dict(sizes=(3, 4), tail=(4, 5, 6), kwargs=dict(momentum=None)),
    "channels_last": dict(sizes=(3, 2), tail=(4, 5, 6), fmt=CL),
    "channels_last_3d": dict(sizes=(2, 1), tail=(3, 2, 3, 4), fmt=CL3),
    "NC": dict(sizes=(6, 3), tail=(5,)),
    "NCL": dict(sizes=(2, 3), tail=(5, 7)),
    "one_each": dict(sizes=(1, 1), tail=(4,)),
    "one_and_three": dict(sizes=(1, 3), tail=(4,), kwargs=dict(momentum=None)),
    "fp64": dict(sizes=(3, 2), tail=(4, 5, 6), dtype=torch.float64, wdtype=torch.float64),
    "bf16+fp32w": dict(sizes=(3, 3), tail=(4, 5, 6), dtype=torch.bfloat16),
    "bf16": dict(sizes=(3, 2), tail=(4, 5, 6), dtype=torch.bfloat16, wdtype=torch.bfloat16),
    "no_affine_no_stats": dict(sizes=(3, 2), tail=(4, 5, 6), kwargs=dict(affine=False, track_running_stats=False)),
}
_STEPS = 3  # forwards per scenario; the last one also runs the backward


def _spec(name):
    s = dict(fmt=None, dtype=torch.float32, wdtype=torch.float32, kwargs={})
    s.update(_SPECS[name])
    return s


def _spec_data(name):
    """Each step's full batch (what a single process sees), the last step's grad, and the
    initial affine parameters."""
    s = _spec(name)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    shape = (sum(s["sizes"]),) + s["tail"]
    xs = [(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(s["dtype"]) for _ in range(_STEPS)]
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(s["dtype"])
    C = s["tail"][0]
    params = torch.randn(C, generator=g), torch.randn(C, generator=g)
    return xs, dy, params


def _rows(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _run_steps(module, xs, dy, fmt, device):
    """The forwards, the last with a backward; what a test compares."""
    for x in xs[:-1]:
        module(_place(x, fmt, device))
    x = _place(xs[-1], fmt, device).requires_grad_()
    y = module(x)
    y.backward(_place(dy, fmt, device))
    out = dict(y=y.detach(), dx=x.grad, y_format_kept=torch.tensor(fmt is None or y.is_contiguous(memory_format=fmt)))
    if module.affine:
        out.update(dweight=module.weight.grad, dbias=module.bias.grad)
    if module.track_running_stats:
        out.update(running_mean=module.running_mean, running_var=module.running_var,
                   num_batches_tracked=module.num_batches_tracked)
    return {k: v.detach().cpu() for k, v in out.items()}


def _place(x, fmt, device):
    x = x.detach().to(device)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _init(module, params):
    if module.affine:
        with torch.no_grad():
            module.weight.copy_(params[0])
            module.bias.copy_(params[1])
    return module


def _rank_spec(name, rank, device):
    s = _spec(name)
    xs, dy, params = _spec_data(name)
    module = _init(fused_norm.FusedSyncBatchNorm(s["tail"][0], device=device, dtype=s["wdtype"], **s["kwargs"]), params)
    return _run_steps(module, [_rows(x, s["sizes"], rank) for x in xs], _rows(dy, s["sizes"], rank), s["fmt"], device)


def _rank_batch_of_one(rank, device):
    """1 value per channel on rank 0, none on rank 1: torch's error, on both ranks."""
    m = fused_norm.FusedSyncBatchNorm(3, device=device)
    try:
        m(torch.randn(1 - rank, 3, device=device))
    except ValueError as e:
        return dict(message=str(e))
    return dict(message="no error")


def _rank_eval(rank, device):
    """Eval mode synchronizes nothing (the ranks even run different numbers of forwards):
    bitwise FusedBatchNorm2d."""
    g = torch.Generator().manual_seed(5)
    plain = fused_norm.FusedBatchNorm2d(4)
    with torch.no_grad():
        plain.running_mean.normal_(generator=g)
        plain.running_var.uniform_(0.5, 2.0, generator=g)
        plain.weight.normal_(generator=g)
    plain.to(device)
    sync = fused_norm.FusedSyncBatchNorm(4).to(device)
    sync.load_state_dict(plain.state_dict())
    plain.eval()
    sync.eval()
    same = True
    for _ in range(rank + 1):
        x = torch.randn(2 + rank, 4, 3, 3, device=device)
        same &= torch.equal(plain(x), sync(x))
    return dict(same=torch.tensor(same))


def _rank_group_of_one(rank, device):
    """A process group of one rank (each rank its own): bitwise FusedBatchNorm2d, training."""
    groups = [dist.new_group([0]), dist.new_group([1])]
    plain = fused_norm.FusedBatchNorm2d(4, momentum=None).to(device)
    sync = fused_norm.FusedSyncBatchNorm(4, momentum=None, process_group=groups[rank]).to(device)
    same = True
    for _ in range(rank + 2):
        x = torch.randn(3, 4, 3, 3, device=device)
        same &= torch.equal(plain(x), sync(x))
    same &= all(torch.equal(a, b) for a, b in zip(plain.buffers(), sync.buffers()))
    return dict(same=torch.tensor(same))


class _DdpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3), fused_norm.FusedBatchNorm2d(8, momentum=None), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


_DDP_BATCH = 4  # per rank


def _ddp_data():
    torch.manual_seed(11)
    model = _DdpNet()
    xs = [torch.randn(2 * _DDP_BATCH, 3, 7, 7).contiguous(memory_format=CL) for _ in range(_STEPS)]
    targets = [torch.randn(2 * _DDP_BATCH, 2) for _ in range(_STEPS)]
    return model, xs, targets


def _train(model, xs, targets):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, t in zip(xs, targets):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()


def _rank_ddp(rank, device):
    """3 SGD steps of DDP on a converted net, each rank a half of the batch (the mean loss
    of a half, averaged by DDP, is the mean loss of the whole)."""
    model, xs, targets = _ddp_data()
    model = model.to(device)
    if device == "cpu":
        # DDP refuses SyncBatchNorm layers in a CPU module when it is built (torch's own
        # need CUDA): wrap first, then convert in place, keeping the Parameter and buffer
        # objects DDP has registered.
        ddp = nn.parallel.DistributedDataParallel(model)
        fused_norm.FusedSyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = fused_norm.FusedSyncBatchNorm.convert_sync_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    kinds = [type(m).__name__ for m in ddp.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sl = slice(rank * _DDP_BATCH, (rank + 1) * _DDP_BATCH)
    _train(ddp, [x[sl].to(device) for x in xs], [t[sl].to(device) for t in targets])
    out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out["all_sync"] = torch.tensor(kinds == ["FusedSyncBatchNorm"] * 3)
    return out


def _rank_compile(rank, device):
    """torch.compile(fullgraph=True) of a net with a FusedSyncBatchNorm, every rank holding
    more than one value per channel, against eager (backend aot_eager: Dynamo's and
    AOTAutograd's tracing, including the collectives, without code generation)."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), fused_norm.FusedSyncBatchNorm(4, momentum=None), nn.ReLU()).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    out = {}
    for step in range(2):
        x = torch.randn(2 + rank, 3, 5, 5, device=device)
        for tag, m in (("eager", eager), ("compiled", compiled)):
            y = m(x)
            y.backward(torch.ones_like(y))
            out[f"{tag}_y{step}"] = y.detach().cpu()
    for tag, m in (("eager", eager), ("compiled", compiled_model)):
        out.update({f"{tag}_{k}": v.detach().cpu() for k, v in m.state_dict().items()})
        out.update({f"{tag}_{k}.grad": p.grad.cpu() for k, p in m.named_parameters()})
    return out


_SPECIAL = {"batch_of_one_error": _rank_batch_of_one, "eval": _rank_eval, "group_of_one": _rank_group_of_one,
            "ddp": _rank_ddp, "compile": _rank_compile}


def _worker(rank, port, backend, out_dir):
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    results = {}
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        for name in list(_SPECS) + list(_SPECIAL):
            torch.manual_seed(100 + rank)
            try:
                results[name] = _SPECIAL[name](rank, device) if name in _SPECIAL else _rank_spec(name, rank, device)
            except Exception:  # reported by the test of that scenario
                results[name] = {"error": traceback.format_exc()}
        dist.destroy_process_group()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_BACKENDS = [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(
        not (CUDA_OK and torch.cuda.device_count() >= 2 and dist.is_nccl_available()), reason="needs 2 GPUs and NCCL")),
]


@pytest.fixture(scope="module", params=_BACKENDS)
def ranks(request, tmp_path_factory):
    """Runs every scenario in 2 processes; returns [rank 0's results, rank 1's]."""
    out_dir = str(tmp_path_factory.mktemp(request.param))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, request.param, out_dir)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + _TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    if hung:
        pytest.fail(f"{request.param}: {len(hung)} rank(s) still running after {_TIMEOUT_S} s (a hang); killed")
    results = []
    for r, p in enumerate(procs):
        path = os.path.join(out_dir, f"rank{r}.pt")
        assert p.exitcode == 0 and os.path.exists(path), f"rank {r} exited with {p.exitcode}"
        results.append(torch.load(path))
    return results


def _result(ranks, name):
    out = []
    for r, res in enumerate(ranks):
        assert name in res, f"rank {r} did not reach {name}"
        assert "error" not in res[name], f"rank {r}:\n{res[name]['error']}"
        out.append(res[name])
    return out


def _module_cls(ndim):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


@pytest.mark.parametrize("name", list(_SPECS))
def test_matches_one_process(ranks, name):
    """Each rank's outputs and input gradients, the ranks' summed weight/bias gradients
    and the running statistics (bitwise the same on both ranks) against torch.nn.BatchNorm
    on the concatenated batch: in the working dtype (theirs) and in float64 (ref)."""
    s = _spec(name)
    got = _result(ranks, name)
    xs, dy, params = _spec_data(name)
    C, cls = s["tail"][0], _module_cls(1 + len(s["tail"]))
    theirs = _init(cls(C, dtype=s["wdtype"], **s["kwargs"]), params)
    ref = _init(cls(C, dtype=torch.float64, **s["kwargs"]), params)
    expected = [_run_steps(theirs, xs, dy, s["fmt"], "cpu"),
                _run_steps(ref, [x.double() for x in xs], dy.double(), s["fmt"], "cpu")]
    both = lambda k: torch.cat([g[k] for g in got])  # noqa: E731
    assert all(g["y_format_kept"] for g in got)
    for k in ("y", "dx"):
        for r in range(2):
            assert got[r][k].shape == _rows(xs[0], s["sizes"], r).shape
        assert_close_to_reference(both(k), expected[0][k], expected[1][k], s["dtype"], k)
        if s["dtype"] == torch.float64:
            torch.testing.assert_close(both(k), expected[1][k], rtol=1e-10, atol=1e-12)
    if theirs.affine:
        for k in ("dweight", "dbias"):
            # Per rank, zeros rather than None from an empty batch (DDP needs every gradient).
            total = got[0][k].double() + got[1][k].double()
            assert_close_to_reference(total.to(s["wdtype"]), expected[0][k], expected[1][k], s["wdtype"], k)
    if theirs.track_running_stats:
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(got[0][k], got[1][k]), k
            assert_close_to_reference(got[0][k], expected[0][k], expected[1][k], s["wdtype"], k)
            if s["dtype"] == torch.float64:
                torch.testing.assert_close(got[0][k], expected[1][k], rtol=1e-12, atol=1e-14)


def test_batch_of_one_counts_every_rank(ranks):
    """1 value per channel across the ranks (1 + 0) is torch's ValueError on both ranks;
    1 + 1 (the one_each scenario) trains."""
    for r, res in enumerate(_result(ranks, "batch_of_one_error")):
        assert res["message"].startswith("Expected more than 1 value per channel when training"), (r, res)


@pytest.mark.parametrize("name", ["eval", "group_of_one"])
def test_unsynchronized_paths_are_fused_batch_norm(ranks, name):
    for r, res in enumerate(_result(ranks, name)):
        assert res["same"], r


def test_ddp_training_matches_one_process(ranks):
    got = _result(ranks, "ddp")
    model, xs, targets = _ddp_data()
    _train(model, xs, targets)
    expected = model.state_dict()
    assert all(g.pop("all_sync") for g in got)
    for r in range(2):
        assert got[r].keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(got[r][k], v, rtol=1e-4, atol=1e-5, msg=f"rank {r}: {k}")


def test_compile_fullgraph(ranks):
    """Traced without a graph break when every rank has more than one value per channel
    (a rank with at most one reads the global count on the host: a graph break, see the
    README)."""
    for r, got in enumerate(_result(ranks, "compile")):
        keys = [k[len("eager_"):] for k in got if k.startswith("eager_")]
        assert len(keys) == 2 + 7 + 4  # outputs, state_dict (4 parameters, 3 buffers), gradients
        for k in keys:
            torch.testing.assert_close(got["compiled_" + k], got["eager_" + k], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {r}: {k}")
