"""Definitions around the C++ ops: fake (meta) kernels for tracing, autograd formulas
and autocast behaviour. Importing this module loads the compiled library.

The autograd of the two forward ops (layer_norm_fwd, batch_norm_fwd) is registered in
C++ (csrc/bindings/autograd.cpp), as a Python autograd kernel costs more than the kernel
itself at small shapes; their backward ops' autograd (the double backward) is here."""

import torch
from torch.autograd.function import once_differentiable

from . import _C  # registers torch.ops.fused_norm.*

ops = torch.ops.fused_norm


def cpu_capability() -> str:
    """Instruction set the CPU kernels run with: 'avx512bf16', 'avx512', 'avx2' or 'baseline'."""
    return _C.get_cpu_capability()


def set_cpu_capability(name: str) -> None:
    """Run the CPU kernels with a narrower instruction set ('avx512', 'avx2', 'baseline'), e.g. to
    test or compare them. Raises ValueError if this processor does not support it.
    The environment variable FUSED_NORM_CPU_CAPABILITY sets the initial choice."""
    _C.set_cpu_capability(name)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------


@torch.library.register_fake("fused_norm::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps):
    k = len(normalized_shape)
    torch._check(k >= 1, lambda: "Expected normalized_shape to be at least 1-dimensional")
    torch._check(
        input.dim() >= k and tuple(input.shape[input.dim() - k:]) == tuple(normalized_shape),
        lambda: f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
        f"[*, {', '.join(str(s) for s in normalized_shape)}], but got input of size{list(input.shape)}",
    )
    stats_shape = list(input.shape[: input.dim() - k]) + [1] * k
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    mean = input.new_empty(stats_shape, dtype=_acc_dtype(input.dtype))
    rstd = input.new_empty(stats_shape, dtype=_acc_dtype(input.dtype))
    return y, mean, rstd


def _param_dtype(input, weight, bias):
    for p in (weight, bias):
        if p is not None and p.dtype != input.dtype:
            return p.dtype
    return input.dtype


@torch.library.register_fake("fused_norm::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, input, normalized_shape, mean, rstd, weight, bias):
    dtype = _param_dtype(input, weight, bias)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    dw = input.new_empty(tuple(normalized_shape) if weight is not None else (0,), dtype=dtype)
    db = input.new_empty(tuple(normalized_shape) if bias is not None else (0,), dtype=dtype)
    return dx, dw, db


def _layer_norm_bwd_setup_context(ctx, inputs, output):
    grad_out, input, normalized_shape, _mean, rstd, weight, bias = inputs
    ctx.normalized_shape = normalized_shape
    ctx.has_bias = bias is not None
    ctx.save_for_backward(grad_out, input, rstd, weight)


@once_differentiable
def _layer_norm_double_backward(ctx, grad_dx, grad_dw, grad_db):
    """Backward of layer_norm_bwd (double backward of layer_norm), by differentiating the
    backward formula written in torch ops, with mean and rstd recomputed from the input
    so that their dependence on it is included. Second order only (once_differentiable):
    a third order raises rather than returning a wrong, disconnected gradient."""
    grad_out, input, rstd, weight = ctx.saved_tensors
    acc = _acc_dtype(input.dtype)
    k = len(ctx.normalized_shape)
    dims = tuple(range(input.dim() - k, input.dim()))
    lead = tuple(range(input.dim() - k))
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (grad_out, input, weight)]
        dy, x, w = (t.to(acc) if t is not None else None for t in leaves)
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        # eps recovered from the saved rstd: r equals the forward's rstd, with var's derivative.
        eps = (rstd.to(acc).reshape(mean.shape).pow(-2) - var).detach()
        r = (var + eps).rsqrt()
        xhat = (x - mean) * r
        g = dy * w if w is not None else dy
        dx = r * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
        outs, grads = [dx], [grad_dx]
        if w is not None and grad_dw is not None and grad_dw.numel():
            outs.append((dy * xhat).sum(lead))
            grads.append(grad_dw)
        if ctx.has_bias and grad_db is not None and grad_db.numel():
            outs.append(dy.sum(lead))
            grads.append(grad_db)
        wanted = [t for t in leaves if t is not None]
        result = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
    d_grad_out, d_input, d_weight = (next(result) if t is not None else None for t in leaves)
    return d_grad_out, d_input, None, None, None, d_weight, None


torch.library.register_autograd(
    "fused_norm::layer_norm_bwd", _layer_norm_double_backward, setup_context=_layer_norm_bwd_setup_context
)
# Autocast, as torch: under CUDA autocast layer_norm runs in float32 (torch's "fp32" cast
# policy: float16/bfloat16 tensors are cast, float64 is not, the output is float32). CPU
# autocast has no rule for layer_norm, and neither device one for batch_norm: the op gets
# its inputs as they are (fp16/bf16 input with fp32 parameters and buffers is a supported
# mix) and returns the input's dtype, which is what an op without a rule does.
# tests/test_autocast_export.py checks every device and dtype against torch.
torch.library.register_autocast("fused_norm::layer_norm_fwd", "cuda", torch.float32)


# vmap (torch.func.vmap, per-sample gradients): the mapped dim becomes one more leading
# dim of the rows, so the fused kernels run once on the whole batch instead of functorch's
# per-sample fallback. A weight or bias mapped too (per-sample parameters) is applied
# outside the kernel, and the backward's parameter gradients are summed per sample.


def _to_front(t, bdim, batch_size):
    """t with its mapped dim first; an unmapped t expanded along a new first dim."""
    if t is None:
        return None
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)


def _per_sample_param(t, bdim, x_dim, k):
    """A (batch, *normalized_shape) parameter viewed to broadcast against the rows of a
    batch-first x of x_dim dims; an unmapped one as it is."""
    if t is None or bdim is None:
        return t
    t = t.movedim(bdim, 0)
    return t.reshape(t.shape[:1] + (1,) * (x_dim - 1 - k) + t.shape[1:])


@torch.library.register_vmap("fused_norm::layer_norm_fwd")
def _layer_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, bias, eps):
    x_bdim, _, w_bdim, b_bdim, _ = in_dims
    x = _to_front(input, x_bdim, info.batch_size)
    if w_bdim is None and b_bdim is None:
        return ops.layer_norm_fwd(x, normalized_shape, weight, bias, eps), (0, 0, 0)
    k = len(normalized_shape)
    y, mean, rstd = ops.layer_norm_fwd(x, normalized_shape, None, None, eps)
    acc = _acc_dtype(x.dtype)
    y = y.to(acc)  # the affine in the accumulation type, as the kernel does
    if weight is not None:
        y = y * _per_sample_param(weight, w_bdim, x.dim(), k).to(acc)
    if bias is not None:
        y = y + _per_sample_param(bias, b_bdim, x.dim(), k).to(acc)
    return (y.to(x.dtype), mean, rstd), (0, 0, 0)


@torch.library.register_vmap("fused_norm::layer_norm_bwd")
def _layer_norm_bwd_vmap(info, in_dims, grad_out, input, normalized_shape, mean, rstd, weight, bias):
    dy_bdim, x_bdim, _, m_bdim, r_bdim, w_bdim, b_bdim = in_dims
    B = info.batch_size
    dy, x, mean, rstd = (_to_front(t, d, B) for t, d in ((grad_out, dy_bdim), (input, x_bdim), (mean, m_bdim),
                                                          (rstd, r_bdim)))
    k = len(normalized_shape)
    acc = _acc_dtype(x.dtype)
    if w_bdim is None and b_bdim is None:
        # dx from the kernel; its dweight/dbias would sum over the samples too.
        dx = ops.layer_norm_bwd(dy, x, normalized_shape, mean, rstd, weight, bias)[0]
    else:  # dx depends on the weight only through g = dy * weight
        g = dy if weight is None else (dy.to(acc) * _per_sample_param(weight, w_bdim, x.dim(), k).to(acc)).to(x.dtype)
        dx = ops.layer_norm_bwd(g, x, normalized_shape, mean, rstd, None, None)[0]
    dtype = _param_dtype(input, weight, bias)
    lead = tuple(range(1, x.dim() - k))  # the rows of one sample
    dw = db = None
    if weight is not None:
        xhat = (x.to(acc) - mean) * rstd
        dw = (dy.to(acc) * xhat).sum(lead).to(dtype) if lead else (dy.to(acc) * xhat).to(dtype)
    if bias is not None:
        db = dy.to(acc).sum(lead).to(dtype) if lead else dy.to(dtype)
    empty = x.new_empty((0,), dtype=dtype)
    return (dx, dw if dw is not None else empty, db if db is not None else empty), \
        (0, 0 if dw is not None else None, 0 if db is not None else None)


# ---------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------


def _batch_norm_format(input):
    """Memory format of the outputs (and of the kernels' view of the input): torch's
    suggest_memory_format, as the C++ op uses."""
    return torch._prims_common.suggest_memory_format(input)


def _batch_norm_param_dtype(input, *params):
    """dtype of weight, bias and the running statistics: the first one given decides."""
    return next((p.dtype for p in params if p is not None), input.dtype)


@torch.library.register_fake("fused_norm::batch_norm_fwd")
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
                         eps):
    C = input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        if t is not None:
            torch._check(t.numel() == C, lambda: f"{name} should contain {C} elements not {t.numel()}")
    torch._check(training or running_mean is not None, lambda: "running_mean must be defined in evaluation mode")
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_batch_norm_format(input))
    save_mean = input.new_empty((C,), dtype=_acc_dtype(input.dtype))
    save_invstd = input.new_empty((C,), dtype=_acc_dtype(input.dtype))
    update = training and running_mean is not None
    dtype = _batch_norm_param_dtype(input, weight, bias, running_mean, running_var)
    new_mean = input.new_empty((C if update else 0,), dtype=dtype)
    new_var = input.new_empty((C if update else 0,), dtype=dtype)
    return y, save_mean, save_invstd, new_mean, new_var


@torch.library.register_fake("fused_norm::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training):
    dtype = _batch_norm_param_dtype(input, weight, bias)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_batch_norm_format(input))
    dw = input.new_empty(weight.shape if weight is not None else (0,), dtype=dtype)
    db = input.new_empty(bias.shape if bias is not None else (0,), dtype=dtype)
    return dx, dw, db


def _batch_norm_bwd_setup_context(ctx, inputs, output):
    grad_out, input, weight, bias, save_mean, save_invstd, training = inputs
    ctx.training = training
    ctx.has_bias = bias is not None
    ctx.save_for_backward(grad_out, input, weight, save_mean, save_invstd)


@once_differentiable
def _batch_norm_double_backward(ctx, grad_dx, grad_dw, grad_db):
    """Backward of batch_norm_bwd (double backward of batch_norm), by differentiating the
    backward formula written in torch ops; in training the batch statistics are
    recomputed from the input so that their dependence on it is included. Second order
    only, as the LayerNorm one."""
    grad_out, input, weight, save_mean, save_invstd = ctx.saved_tensors
    acc = _acc_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    shape = [1, -1] + [1] * (input.dim() - 2)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (grad_out, input, weight)]
        dy, x, w = (t.to(acc) if t is not None else None for t in leaves)
        if ctx.training:
            mean = x.mean(dims, keepdim=True)
            var = (x - mean).square().mean(dims, keepdim=True)
            # eps recovered from the saved invstd: r equals the forward's invstd, with var's derivative.
            eps = (save_invstd.to(acc).view(shape).pow(-2) - var).detach()
            r = (var + eps).rsqrt()
        else:
            mean = save_mean.to(acc).view(shape)
            r = save_invstd.to(acc).view(shape)
        xhat = (x - mean) * r
        a = r * w.view(shape) if w is not None else r
        if ctx.training:
            dx = a * (dy - dy.mean(dims, keepdim=True) - xhat * (dy * xhat).mean(dims, keepdim=True))
        else:
            dx = a * dy
        outs, grads = [dx], [grad_dx]
        if w is not None and grad_dw.numel():
            outs.append((dy * xhat).sum(dims).view(w.shape))
            grads.append(grad_dw)
        if ctx.has_bias and grad_db.numel():
            outs.append(dy.sum(dims))
            grads.append(grad_db.view(-1))
        wanted = [t for t in leaves if t is not None]
        result = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
    d_grad_out, d_input, d_weight = (next(result) if t is not None else None for t in leaves)
    return d_grad_out, d_input, d_weight, None, None, None, None


torch.library.register_autograd(
    "fused_norm::batch_norm_bwd", _batch_norm_double_backward, setup_context=_batch_norm_bwd_setup_context
)


# vmap: a mapped (N, C, *S) input becomes one (N, B*C, *S) batch of B*C channels (the
# samples' channels side by side), so the kernels compute every sample's statistics in
# one call; the per-channel tensors become (B*C,). An eval input with unmapped per-channel
# tensors is folded into the rows instead (B*N, C, *S): no copy.

_BN_RUNNING_STATS_NOT_BATCHED = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please see "
    "the functorch website for resources on how to patch your module to work with vmap"
)


def _bn_channels(t, bdim, batch_size):
    """An input-like tensor of the samples (N, C, *S) as (N, B*C, *S)."""
    t = _to_front(t, bdim, batch_size).movedim(0, 1)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _bn_per_channel(t, bdim, batch_size):
    """A per-channel (C,) tensor of the samples as (B*C,)."""
    return None if t is None else _to_front(t, bdim, batch_size).reshape(-1)


def _bn_unfold(t, batch_size):
    """(N, B*C, *S) back to (N, B, C, *S): the mapped dim is 1."""
    return t.view(t.shape[0], batch_size, -1, *t.shape[2:])


def _bn_samples(t, batch_size):
    """A (B*C,) result as (B, C) and its mapped dim 0; an empty one (not computed: no
    running update, gradient not wanted) unmapped."""
    return (t.view(batch_size, -1), 0) if t.numel() else (t, None)


@torch.library.register_vmap("fused_norm::batch_norm_fwd")
def _batch_norm_fwd_vmap(info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked,
                         training, momentum, eps):
    x_bdim, w_bdim, b_bdim, rm_bdim, rv_bdim, n_bdim = in_dims[:6]
    B = info.batch_size
    if training and running_mean is not None and (rm_bdim is None or rv_bdim is None):
        raise RuntimeError(_BN_RUNNING_STATS_NOT_BATCHED)
    if momentum is not None:
        num_batches_tracked, n_bdim = None, None  # read only for the cumulative average
    if n_bdim is not None:  # a factor 1/num_batches_tracked per sample: one call each
        per_sample = [ops.batch_norm_fwd(*(t if d is None or t is None else t.select(d, i) for t, d in
                                           zip((input, weight, bias, running_mean, running_var, num_batches_tracked),
                                               in_dims[:6])), training, momentum, eps) for i in range(B)]
        return tuple(torch.stack(outs) for outs in zip(*per_sample)), (0,) * 5
    if not training and x_bdim is not None and all(d is None for d in in_dims[1:5]):
        x = input.movedim(x_bdim, 0)
        y, mean, invstd, new_mean, new_var = ops.batch_norm_fwd(
            x.reshape(-1, *x.shape[2:]), weight, bias, running_mean, running_var, None, training, momentum, eps)
        return (y.view(x.shape), mean, invstd, new_mean, new_var), (0, None, None, None, None)
    y, mean, invstd, new_mean, new_var = ops.batch_norm_fwd(
        _bn_channels(input, x_bdim, B), *(_bn_per_channel(t, d, B) for t, d in zip(
            (weight, bias, running_mean, running_var), (w_bdim, b_bdim, rm_bdim, rv_bdim))),
        num_batches_tracked, training, momentum, eps)
    outs, dims = zip((_bn_unfold(y, B), 1), *(_bn_samples(t, B) for t in (mean, invstd, new_mean, new_var)))
    return outs, dims


@torch.library.register_vmap("fused_norm::batch_norm_bwd")
def _batch_norm_bwd_vmap(info, in_dims, grad_out, input, weight, bias, save_mean, save_invstd, training):
    B = info.batch_size
    dx, dw, db = ops.batch_norm_bwd(
        _bn_channels(grad_out, in_dims[0], B), _bn_channels(input, in_dims[1], B),
        *(_bn_per_channel(t, d, B) for t, d in zip((weight, bias, save_mean, save_invstd), in_dims[2:6])), training)
    outs, dims = zip((_bn_unfold(dx, B), 1), _bn_samples(dw, B), _bn_samples(db, B))
    return outs, dims


# ---------------------------------------------------------------------------------------
# BatchNorm phases for a synchronized BatchNorm (FusedSyncBatchNorm): the statistics,
# and the backward's per-channel sums and dx, as separate ops so that collectives can
# combine the ranks' partial results in between.
# ---------------------------------------------------------------------------------------


def _channel_dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    """A (C,) tensor viewed to broadcast along dim 1 of x."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


@torch.library.register_fake("fused_norm::batch_norm_stats")
def _batch_norm_stats_fake(input):
    C = input.shape[1]
    return input.new_empty((C,), dtype=_acc_dtype(input.dtype)), input.new_empty((C,), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("fused_norm::batch_norm_bwd_reduce")
def _batch_norm_bwd_reduce_fake(grad_out, input, mean):
    C = input.shape[1]
    return input.new_empty((C,), dtype=_acc_dtype(input.dtype)), input.new_empty((C,), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("fused_norm::batch_norm_bwd_elemt")
def _batch_norm_bwd_elemt_fake(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_batch_norm_format(input))


# The same three in torch ops (in the stat dtype): their autograd differentiates these.
def _batch_norm_stats_math(input):
    var, mean = torch.var_mean(input.to(_acc_dtype(input.dtype)), _channel_dims(input), correction=0)
    return mean, var


def _batch_norm_bwd_reduce_math(grad_out, input, mean):
    acc = _acc_dtype(input.dtype)
    dy = grad_out.to(acc)
    xmu = input.to(acc) - _per_channel(mean, input)
    return dy.sum(_channel_dims(input)), (dy * xmu).sum(_channel_dims(input))


def _batch_norm_bwd_elemt_math(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count):
    acc = _acc_dtype(input.dtype)
    n = count.to(acc)
    r = _per_channel(invstd, input)
    a = r * _per_channel(weight.to(acc), input) if weight is not None else r
    xmu = input.to(acc) - _per_channel(mean, input)
    dx = (grad_out.to(acc) - _per_channel(sum_dy, input) / n - xmu * r * r * _per_channel(sum_dy_xmu, input) / n) * a
    return (dx.to(input.dtype),)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_of(math):
    """Autograd formula of an op whose arguments are all tensors (or None): the
    vector-Jacobian product of `math` (the op in torch ops) at the saved inputs.
    Differentiable again (create_graph), so higher orders work too."""

    def backward(ctx, *grads):
        inputs = ctx.saved_tensors
        wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
        result = [None] * len(inputs)
        create_graph = torch.is_grad_enabled()  # backward of a backward: keep the graph
        with torch.enable_grad():
            # The saved inputs themselves (not detached copies), so that with create_graph
            # the gradients stay connected to them.
            leaves = [t.detach().requires_grad_() if i in wanted and not t.requires_grad else t
                      for i, t in enumerate(inputs)]
            pairs = [(out, g) for out, g in zip(math(*leaves), grads) if g is not None]
            if not wanted or not pairs:
                return tuple(result)
            got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                      allow_unused=True, create_graph=create_graph)
        for i, g in zip(wanted, got):
            result[i] = g
        return tuple(result)

    return backward


for _name, _math in (("batch_norm_stats", _batch_norm_stats_math),
                     ("batch_norm_bwd_reduce", _batch_norm_bwd_reduce_math),
                     ("batch_norm_bwd_elemt", _batch_norm_bwd_elemt_math)):
    torch.library.register_autograd(f"fused_norm::{_name}", _backward_of(_math), setup_context=_save_inputs)
del _name, _math
