"""Definitions around the C++ ops: fake (meta) kernels for tracing, autograd formulas
and autocast behaviour. Importing this module loads the compiled library.

The autograd of the two forward ops (layer_norm_fwd, batch_norm_fwd) is registered in
C++ (csrc/bindings/autograd.cpp), as a Python autograd kernel costs more than the kernel
itself at small shapes; their backward ops' autograd (the double backward) is here."""

import torch

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


def _check_devices(input, *tensors):
    """torch's error for a tensor on another device than the input. The fake kernels need
    it: the dispatcher sends a call with one meta tensor among CPU ones to them."""
    for t in tensors:
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device {input.device}!")


def _sum_over(t, dims):
    """t summed over dims; no dims: t itself (a sum over no dims would sum everything)."""
    return t.sum(dims) if dims else t


def _channel_dims(x):
    return [0] + list(range(2, x.dim()))


def _per_channel(t, x):
    """A (C,) tensor viewed to broadcast along dim 1 of x."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _save_inputs(ctx, inputs, output):
    """setup_context of an op whose autograd is _backward_of(math): saves its tensor
    arguments, and keeps the others (ints, bools, None) on ctx."""
    ctx.args = [None if isinstance(a, torch.Tensor) else a for a in inputs]
    ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs))


def _backward_of(math):
    """Autograd formula of an op: the vector-Jacobian product of `math` (the op in torch
    ops, with the op's arguments; None for an output not computed) at the saved inputs.
    Differentiable again (create_graph), so every higher order works too.

    Saved inputs may have history of their own (the incoming gradient of a nonlinear loss
    depends on the forward's input; a saved forward output depends on its inputs), so
    the product is taken at detached copies: autograd.grad at the tensors themselves would
    also run their history (again, and into the result). Recording a graph, torch.func.vjp
    computes it at its own level, which keeps the result connected to the saved inputs."""

    def backward(ctx, *grads):
        inputs = [t if a is None else a for t, a in zip(ctx.saved_tensors, ctx.args)]
        wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
        result = [None] * len(inputs)
        if not wanted:
            return tuple(result)

        def outputs_of(*values):
            args = list(inputs)
            for i, v in zip(wanted, values):
                args[i] = v
            return math(*args)

        if torch.is_grad_enabled():  # backward of a backward: keep the graph
            outs, vjp_fn = torch.func.vjp(lambda *v: tuple(o if o is not None else v[0].new_zeros(())
                                                           for o in outputs_of(*v)), *(inputs[i] for i in wanted))
            got = vjp_fn(tuple(g if g is not None and g.shape == o.shape else torch.zeros_like(o)
                               for o, g in zip(outs, grads)))
        else:
            with torch.enable_grad():
                leaves = [inputs[i].detach().requires_grad_() for i in wanted]
                # (an output not depending on the wanted inputs adds nothing)
                pairs = [(out, g) for out, g in zip(outputs_of(*leaves), grads)
                         if out is not None and out.requires_grad and g is not None]
                if not pairs:
                    return tuple(result)
                got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        for i, g in zip(wanted, got):
            result[i] = g
        return tuple(result)

    return backward


# torch.func (grad, vjp, jacrev, vmap of them: per-sample gradients) refuses the
# autograd.Function that torch.library.register_autograd makes (it has no separate
# setup_context), and it must meet an autograd.Function before the dispatcher: not as an
# op's Autograd kernel. So while a torch.func transform is active the functional forms
# call the add-norm forward ops, and their backward the backward ops, through classes made
# by _functorch_function, and the ops themselves otherwise (the ops called directly do not
# support torch.func.grad). Such a class's forward is the op (under vmap: the op's batching
# rule, on the whole batch), its setup_context and backward those registered for the op.


def functorch_active() -> bool:
    """Whether a torch.func transform is active (never, to torch.compile's tracing)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def _functorch_function(name, backward, setup_context):
    op = getattr(ops, name).default
    return type(f"_{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "generate_vmap_rule": True})


# ---------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------


@torch.library.register_fake("fused_norm::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps, shape_sep=", "):
    _check_devices(input, weight, bias)
    k = len(normalized_shape)
    torch._check(k >= 1, lambda: "Expected normalized_shape to be at least 1-dimensional")
    torch._check(
        input.dim() >= k and tuple(input.shape[input.dim() - k:]) == tuple(normalized_shape),
        lambda: f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
        f"[*{shape_sep}{', '.join(str(s) for s in normalized_shape)}], but got input of size{list(input.shape)}",
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
    _check_devices(input, grad_out, mean, rstd, weight, bias)
    dtype = _param_dtype(input, weight, bias)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    dw = input.new_empty(tuple(normalized_shape) if weight is not None else (0,), dtype=dtype)
    db = input.new_empty(tuple(normalized_shape) if bias is not None else (0,), dtype=dtype)
    return dx, dw, db


def _layer_norm_bwd_math(grad_out, input, normalized_shape, mean, rstd, weight, bias):
    """layer_norm_bwd in torch ops, for its autograd (the double backward of layer_norm and
    every higher order): mean and rstd are recomputed from the input so that their
    dependence on it is differentiated, eps recovered from the saved rstd."""
    acc = _acc_dtype(input.dtype)
    k = len(normalized_shape)
    dims = tuple(range(input.dim() - k, input.dim()))
    lead = tuple(range(input.dim() - k))
    dy, x = grad_out.to(acc), input.to(acc)
    mu = x.mean(dims, keepdim=True)
    var = (x - mu).square().mean(dims, keepdim=True)
    # r equals the forward's rstd, with var's derivative.
    eps = rstd.detach().to(acc).reshape(mu.shape).pow(-2) - var.detach()
    r = (var + eps).rsqrt()
    xhat = (x - mu) * r
    g = dy * weight.to(acc) if weight is not None else dy
    dx = r * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
    dtype = _param_dtype(input, weight, bias)
    dw = _sum_over(dy * xhat, lead).to(dtype) if weight is not None else None
    db = _sum_over(dy, lead).to(dtype) if bias is not None else None
    return dx.to(input.dtype), dw, db


torch.library.register_autograd("fused_norm::layer_norm_bwd", _backward_of(_layer_norm_bwd_math),
                                setup_context=_save_inputs)
# ---------------------------------------------------------------------------------------
# Residual add + LayerNorm (add_layer_norm): the norm of input + residual, with the sum
# (the new residual stream) as a second output unless store_sum is False (post-norm).
# Its autograd is registered here (not in C++ as layer_norm_fwd's): the op is meant for
# transformer-sized rows, where the Python kernel's few microseconds do not show.
# ---------------------------------------------------------------------------------------


def _add_sum_dtype(x_dtype, r_dtype, residual_in_fp32):
    """dtype of the sum (the C++ op's sum_dtype(), with its messages)."""
    reduced = (torch.float16, torch.bfloat16)
    torch._check(r_dtype == x_dtype or (x_dtype in reduced and r_dtype == torch.float32),
                 lambda: "fused_norm::add_layer_norm: residual must have input's dtype, or float32 for "
                 f"float16/bfloat16 input; got input {x_dtype} and residual {r_dtype}")
    torch._check(not residual_in_fp32 or x_dtype != torch.float64,
                 lambda: f"fused_norm::add_layer_norm: residual_in_fp32 needs float32, float16 or bfloat16 input, "
                 f"got {x_dtype}")
    return torch.float32 if residual_in_fp32 else r_dtype


def _check_residual(input, residual):
    if residual.device != input.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{input.device} and {residual.device}!")
    if residual.shape != input.shape:
        a, b = list(input.shape), list(residual.shape)
        for i in range(1, max(len(a), len(b)) + 1):
            sa = a[-i] if i <= len(a) else 1
            sb = b[-i] if i <= len(b) else 1
            torch._check(sa == sb or sa == 1 or sb == 1,
                         lambda: f"The size of tensor a ({sa}) must match the size of tensor b ({sb}) at "
                         f"non-singleton dimension {max(len(a), len(b)) - i}")
        torch._check(False, lambda: "fused_norm::add_layer_norm: residual must have input's shape (no "
                     f"broadcasting), got input of size {a} and residual of size {b}")


@torch.library.register_fake("fused_norm::add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, store_sum):
    _check_residual(input, residual)
    sum_dtype = _add_sum_dtype(input.dtype, residual.dtype, residual_in_fp32)
    y, mean, rstd = _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps)
    s = torch.empty(input.shape if store_sum else (0,), dtype=sum_dtype, device=input.device)
    return y, s, mean, rstd


@torch.library.register_fake("fused_norm::add_layer_norm_bwd")
def _add_layer_norm_bwd_fake(grad_out, grad_sum, x, residual, normalized_shape, mean, rstd, weight, bias, sum_dtype,
                             residual_dtype):
    _check_devices(x, grad_out, grad_sum, residual, mean, rstd, weight, bias)
    dtype = _param_dtype(grad_out, weight, bias)
    dx = torch.empty(x.shape, dtype=grad_out.dtype, device=x.device)
    dres = torch.empty(x.shape if residual_dtype != grad_out.dtype else (0,), dtype=residual_dtype, device=x.device)
    dw = x.new_empty(tuple(normalized_shape) if weight is not None else (0,), dtype=dtype)
    db = x.new_empty(tuple(normalized_shape) if bias is not None else (0,), dtype=dtype)
    return dx, dres, dw, db


def _add_layer_norm_setup(ctx, inputs, output):
    input, residual, normalized_shape, weight, bias, _, _, store_sum = inputs
    s, mean, rstd = output[1:]
    # The stored sum is all the backward needs of the rows; without it (post-norm) the
    # backward forms it again from input and residual.
    x, res = (s, None) if store_sum else (input, residual)
    ctx.save_for_backward(x, res, mean, rstd, weight, bias)
    ctx.normalized_shape = normalized_shape
    ctx.dtypes = (input.dtype, s.dtype, residual.dtype)
    ctx.store_sum = store_sum


def _add_layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    x, res, mean, rstd, weight, bias = ctx.saved_tensors
    x_dtype, sum_dtype, r_dtype = ctx.dtypes
    if dy is None:  # only the sum reached the loss
        dy = torch.zeros(x.shape, dtype=x_dtype, device=x.device)
    bwd = AddLayerNormBwdFunction.apply if functorch_active() else ops.add_layer_norm_bwd
    dx, dres, dw, db = bwd(dy, ds if ctx.store_sum else None, x, res, ctx.normalized_shape, mean, rstd, weight, bias,
                           sum_dtype, r_dtype)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, (dx if r_dtype == x_dtype else dres) if need[1] else None, None,
            dw if weight is not None and need[3] else None, db if bias is not None and need[4] else None,
            None, None, None)


torch.library.register_autograd("fused_norm::add_layer_norm_fwd", _add_layer_norm_backward,
                                setup_context=_add_layer_norm_setup)
AddLayerNormFunction = _functorch_function("add_layer_norm_fwd", _add_layer_norm_backward, _add_layer_norm_setup)


def _add_norm_sum(x, residual, sum_dtype, acc):
    """The rows an add-norm backward normalizes: x itself (the stored sum), or input +
    residual added in acc and rounded to sum_dtype, as the kernels form them again."""
    return x if residual is None else (x.to(acc) + residual.to(acc)).to(sum_dtype)


def _add_norm_dx(dx, grad_sum, grad_out, residual_dtype, acc):
    """The norm's dx plus the sum's gradient (when given), in grad_out's dtype, and in the
    residual's dtype when it differs (else None)."""
    dx = dx.to(acc) if grad_sum is None else dx.to(acc) + grad_sum.to(acc)
    return dx.to(grad_out.dtype), dx.to(residual_dtype) if residual_dtype != grad_out.dtype else None


def _add_layer_norm_bwd_math(grad_out, grad_sum, x, residual, normalized_shape, mean, rstd, weight, bias, sum_dtype,
                             residual_dtype):
    """add_layer_norm_bwd in torch ops (its autograd: the double backward of
    add_layer_norm): layer_norm_bwd's formula on the sum, formed again as the kernels do
    when the backward was given input and residual, plus the sum's gradient."""
    acc = _acc_dtype(grad_out.dtype)
    s = _add_norm_sum(x, residual, sum_dtype, acc)
    dx, dw, db = _layer_norm_bwd_math(grad_out, s, normalized_shape, mean, rstd, weight, bias)
    return *_add_norm_dx(dx, grad_sum, grad_out, residual_dtype, acc), dw, db


torch.library.register_autograd("fused_norm::add_layer_norm_bwd", _backward_of(_add_layer_norm_bwd_math),
                                setup_context=_save_inputs)
AddLayerNormBwdFunction = _functorch_function("add_layer_norm_bwd", _backward_of(_add_layer_norm_bwd_math),
                                              _save_inputs)


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


def _per_sample_affine(y, weight, w_bdim, bias, b_bdim, k):
    """LayerNorm's affine with per-sample (mapped) parameters, applied to the normalized
    y of a batch-first x in the accumulation type (as the kernel does), in y's dtype."""
    acc = _acc_dtype(y.dtype)
    out = y.to(acc)
    if weight is not None:
        out = out * _per_sample_param(weight, w_bdim, y.dim(), k).to(acc)
    if bias is not None:
        out = out + _per_sample_param(bias, b_bdim, y.dim(), k).to(acc)
    return out.to(y.dtype)


@torch.library.register_vmap("fused_norm::layer_norm_fwd")
def _layer_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, bias, eps):
    x_bdim, _, w_bdim, b_bdim, _ = in_dims
    x = _to_front(input, x_bdim, info.batch_size)
    if w_bdim is None and b_bdim is None:
        return ops.layer_norm_fwd(x, normalized_shape, weight, bias, eps), (0, 0, 0)
    y, mean, rstd = ops.layer_norm_fwd(x, normalized_shape, None, None, eps)
    return (_per_sample_affine(y, weight, w_bdim, bias, b_bdim, len(normalized_shape)), mean, rstd), (0, 0, 0)


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
        dw = _sum_over(dy.to(acc) * xhat, lead).to(dtype)
    if bias is not None:
        db = _sum_over(dy.to(acc), lead).to(dtype)
    empty = x.new_empty((0,), dtype=dtype)
    return (dx, dw if dw is not None else empty, db if db is not None else empty), \
        (0, 0 if dw is not None else None, 0 if db is not None else None)


# ---------------------------------------------------------------------------------------
# RMSNorm: LayerNorm's kernels without the mean and the bias (csrc/params.h). The op's
# weight_offset is added to the weight (Gemma's x_hat * (1 + w)); round_xhat rounds
# x_hat to the input's dtype before the weight multiplies it (Llama's
# weight * x_hat.to(input_dtype)).
# ---------------------------------------------------------------------------------------


@torch.library.register_fake("fused_norm::rms_norm_fwd")
def _rms_norm_fwd_fake(input, normalized_shape, weight, eps, weight_offset=0.0, round_xhat=False):
    y, _, rstd = _layer_norm_fwd_fake(input, normalized_shape, weight, None, eps, shape_sep="")  # torch's message
    if not input.is_contiguous() and torch._prims_common.is_non_overlapping_and_dense_or_false(input):
        y = torch.empty_like(input)  # keeps a dense input's strides, as torch's rms_norm (the C++ op)
    return y, rstd


@torch.library.register_fake("fused_norm::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, input, normalized_shape, rstd, weight, weight_offset=0.0):
    _check_devices(input, grad_out, rstd, weight)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    dw = input.new_empty(tuple(normalized_shape) if weight is not None else (0,), dtype=_param_dtype(input, weight,
                                                                                                      None))
    return dx, dw


def _rms_norm_bwd_math(grad_out, input, normalized_shape, rstd, weight, weight_offset=0.0):
    """rms_norm_bwd in torch ops, for its autograd (the double backward of rms_norm and
    every higher order): rstd recomputed from the input so that its dependence on it is
    differentiated, eps recovered from the saved rstd."""
    acc = _acc_dtype(input.dtype)
    k = len(normalized_shape)
    dims = tuple(range(input.dim() - k, input.dim()))
    lead = tuple(range(input.dim() - k))
    dy, x = grad_out.to(acc), input.to(acc)
    ms = x.square().mean(dims, keepdim=True)
    eps = rstd.detach().to(acc).reshape(ms.shape).pow(-2) - ms.detach()
    r = (ms + eps).rsqrt()
    xhat = x * r
    g = dy * (weight.to(acc) + weight_offset) if weight is not None else dy
    dx = r * (g - xhat * (g * xhat).mean(dims, keepdim=True))
    dw = _sum_over(dy * xhat, lead).to(_param_dtype(input, weight, None)) if weight is not None else None
    return dx.to(input.dtype), dw


torch.library.register_autograd("fused_norm::rms_norm_bwd", _backward_of(_rms_norm_bwd_math),
                                setup_context=_save_inputs)


# Residual add + RMSNorm (add_rms_norm): as add_layer_norm, on the RMSNorm kernels.


@torch.library.register_fake("fused_norm::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(input, residual, normalized_shape, weight, eps, weight_offset, round_xhat,
                           residual_in_fp32, store_sum):
    _check_residual(input, residual)
    sum_dtype = _add_sum_dtype(input.dtype, residual.dtype, residual_in_fp32)
    y, _, rstd = _layer_norm_fwd_fake(input, normalized_shape, weight, None, eps, shape_sep="")
    s = torch.empty(input.shape if store_sum else (0,), dtype=sum_dtype, device=input.device)
    return y, s, rstd


@torch.library.register_fake("fused_norm::add_rms_norm_bwd")
def _add_rms_norm_bwd_fake(grad_out, grad_sum, x, residual, normalized_shape, rstd, weight, weight_offset,
                           sum_dtype, residual_dtype):
    dx, dres, dw, _ = _add_layer_norm_bwd_fake(grad_out, grad_sum, x, residual, normalized_shape, rstd, rstd,
                                               weight, None, sum_dtype, residual_dtype)
    return dx, dres, dw


def _add_rms_norm_setup(ctx, inputs, output):
    input, residual, normalized_shape, weight, _, weight_offset, _, _, store_sum = inputs
    s, rstd = output[1:]
    x, res = (s, None) if store_sum else (input, residual)
    ctx.save_for_backward(x, res, rstd, weight)
    ctx.normalized_shape = normalized_shape
    ctx.weight_offset = weight_offset
    ctx.dtypes = (input.dtype, s.dtype, residual.dtype)
    ctx.store_sum = store_sum


def _add_rms_norm_backward(ctx, dy, ds, _drstd):
    x, res, rstd, weight = ctx.saved_tensors
    x_dtype, sum_dtype, r_dtype = ctx.dtypes
    if dy is None:  # only the sum reached the loss
        dy = torch.zeros(x.shape, dtype=x_dtype, device=x.device)
    bwd = AddRMSNormBwdFunction.apply if functorch_active() else ops.add_rms_norm_bwd
    dx, dres, dw = bwd(dy, ds if ctx.store_sum else None, x, res, ctx.normalized_shape, rstd, weight, ctx.weight_offset,
                       sum_dtype, r_dtype)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, (dx if r_dtype == x_dtype else dres) if need[1] else None, None,
            dw if weight is not None and need[3] else None, None, None, None, None, None)


torch.library.register_autograd("fused_norm::add_rms_norm_fwd", _add_rms_norm_backward,
                                setup_context=_add_rms_norm_setup)
AddRMSNormFunction = _functorch_function("add_rms_norm_fwd", _add_rms_norm_backward, _add_rms_norm_setup)


def _add_rms_norm_bwd_math(grad_out, grad_sum, x, residual, normalized_shape, rstd, weight, weight_offset, sum_dtype,
                           residual_dtype):
    """add_rms_norm_bwd in torch ops (its autograd), as _add_layer_norm_bwd_math."""
    acc = _acc_dtype(grad_out.dtype)
    s = _add_norm_sum(x, residual, sum_dtype, acc)
    dx, dw = _rms_norm_bwd_math(grad_out, s, normalized_shape, rstd, weight, weight_offset)
    return *_add_norm_dx(dx, grad_sum, grad_out, residual_dtype, acc), dw


torch.library.register_autograd("fused_norm::add_rms_norm_bwd", _backward_of(_add_rms_norm_bwd_math),
                                setup_context=_save_inputs)
AddRMSNormBwdFunction = _functorch_function("add_rms_norm_bwd", _backward_of(_add_rms_norm_bwd_math),
                                            _save_inputs)


@torch.library.register_vmap("fused_norm::rms_norm_fwd")
def _rms_norm_fwd_vmap(info, in_dims, input, normalized_shape, weight, eps, weight_offset=0.0, round_xhat=False):
    x_bdim, _, w_bdim = in_dims[:3]
    x = _to_front(input, x_bdim, info.batch_size)
    if w_bdim is None:
        return ops.rms_norm_fwd(x, normalized_shape, weight, eps, weight_offset, round_xhat), (0, 0)
    y, rstd = ops.rms_norm_fwd(x, normalized_shape, None, eps, 0.0, round_xhat)
    acc = _acc_dtype(x.dtype)
    w = _per_sample_param(weight, w_bdim, x.dim(), len(normalized_shape)).to(acc) + weight_offset
    return ((y.to(acc) * w).to(x.dtype), rstd), (0, 0)


@torch.library.register_vmap("fused_norm::rms_norm_bwd")
def _rms_norm_bwd_vmap(info, in_dims, grad_out, input, normalized_shape, rstd, weight, weight_offset=0.0):
    dy_bdim, x_bdim, _, r_bdim, w_bdim = in_dims[:5]
    B = info.batch_size
    dy, x, rstd = (_to_front(t, d, B) for t, d in ((grad_out, dy_bdim), (input, x_bdim), (rstd, r_bdim)))
    k = len(normalized_shape)
    acc = _acc_dtype(x.dtype)
    if w_bdim is None:
        dx = ops.rms_norm_bwd(dy, x, normalized_shape, rstd, weight, weight_offset)[0]
    else:  # dx depends on the weight only through g = dy * (weight + weight_offset)
        w = _per_sample_param(weight, w_bdim, x.dim(), k).to(acc) + weight_offset
        dx = ops.rms_norm_bwd((dy.to(acc) * w).to(x.dtype), x, normalized_shape, rstd, None)[0]
    dtype = _param_dtype(input, weight, None)
    if weight is None:
        return (dx, x.new_empty((0,), dtype=dtype)), (0, None)
    lead = tuple(range(1, x.dim() - k))  # the rows of one sample
    return (dx, _sum_over(dy.to(acc) * (x.to(acc) * rstd), lead).to(dtype)), (0, 0)


# vmap of the residual add + norm ops, as the rules above: input and residual (either one
# may be unmapped: it is expanded, a view) batch-first, one kernel call; a mapped weight or
# bias applied outside the kernel; the parameter gradients summed per sample, from the sum
# (stored, or formed again from input and residual as the kernels do).


def _add_norm_bwd_outputs(dx, dres, dw, db, grad_out, residual_dtype, dtype, with_bias=True):
    """The outputs of a batched add-norm backward and their mapped dims: dres (computed only
    for a residual dtype other than grad_out's) and the parameter gradients not computed
    are empty and unmapped, as the op returns them."""
    empty = dx.new_empty((0,), dtype=dtype)
    outs = [dx, dres, dw if dw is not None else empty]
    dims = [0, 0 if residual_dtype != grad_out.dtype else None, 0 if dw is not None else None]
    if with_bias:
        outs.append(db if db is not None else empty)
        dims.append(0 if db is not None else None)
    return tuple(outs), tuple(dims)


@torch.library.register_vmap("fused_norm::add_layer_norm_fwd")
def _add_layer_norm_fwd_vmap(info, in_dims, input, residual, normalized_shape, weight, bias, eps, residual_in_fp32,
                             store_sum):
    x_bdim, r_bdim, _, w_bdim, b_bdim = in_dims[:5]
    B = info.batch_size
    x, r = _to_front(input, x_bdim, B), _to_front(residual, r_bdim, B)
    s_bdim = 0 if store_sum else None  # (not stored: an empty tensor, the same for every sample)
    if w_bdim is None and b_bdim is None:
        return ops.add_layer_norm_fwd(x, r, normalized_shape, weight, bias, eps, residual_in_fp32, store_sum), \
            (0, s_bdim, 0, 0)
    y, s, mean, rstd = ops.add_layer_norm_fwd(x, r, normalized_shape, None, None, eps, residual_in_fp32, store_sum)
    return (_per_sample_affine(y, weight, w_bdim, bias, b_bdim, len(normalized_shape)), s, mean, rstd), \
        (0, s_bdim, 0, 0)


@torch.library.register_vmap("fused_norm::add_layer_norm_bwd")
def _add_layer_norm_bwd_vmap(info, in_dims, grad_out, grad_sum, x, residual, normalized_shape, mean, rstd, weight,
                             bias, sum_dtype, residual_dtype):
    dy_bdim, ds_bdim, x_bdim, r_bdim, _, m_bdim, rs_bdim, w_bdim, b_bdim = in_dims[:9]
    B = info.batch_size
    dy, ds, xs, res, mean, rstd = (_to_front(t, d, B) for t, d in (
        (grad_out, dy_bdim), (grad_sum, ds_bdim), (x, x_bdim), (residual, r_bdim), (mean, m_bdim), (rstd, rs_bdim)))
    k = len(normalized_shape)
    acc = _acc_dtype(grad_out.dtype)
    if w_bdim is None and b_bdim is None:
        # dx from the kernel; its dweight/dbias would sum over the samples too.
        dx, dres = ops.add_layer_norm_bwd(dy, ds, xs, res, normalized_shape, mean, rstd, weight, bias, sum_dtype,
                                          residual_dtype)[:2]
    else:  # dx depends on the weight only through g = dy * weight
        g = dy if weight is None else \
            (dy.to(acc) * _per_sample_param(weight, w_bdim, dy.dim(), k).to(acc)).to(dy.dtype)
        dx, dres = ops.add_layer_norm_bwd(g, ds, xs, res, normalized_shape, mean, rstd, None, None, sum_dtype,
                                          residual_dtype)[:2]
    lead = tuple(range(1, dy.dim() - k))  # the rows of one sample
    dtype = _param_dtype(grad_out, weight, bias)
    dw = db = None
    if weight is not None:
        xhat = (_add_norm_sum(xs, res, sum_dtype, acc).to(acc) - mean) * rstd
        dw = _sum_over(dy.to(acc) * xhat, lead).to(dtype)
    if bias is not None:
        db = _sum_over(dy.to(acc), lead).to(dtype)
    return _add_norm_bwd_outputs(dx, dres, dw, db, grad_out, residual_dtype, dtype)


@torch.library.register_vmap("fused_norm::add_rms_norm_fwd")
def _add_rms_norm_fwd_vmap(info, in_dims, input, residual, normalized_shape, weight, eps, weight_offset, round_xhat,
                           residual_in_fp32, store_sum):
    x_bdim, r_bdim, _, w_bdim = in_dims[:4]
    B = info.batch_size
    x, r = _to_front(input, x_bdim, B), _to_front(residual, r_bdim, B)
    s_bdim = 0 if store_sum else None
    if w_bdim is None:
        return ops.add_rms_norm_fwd(x, r, normalized_shape, weight, eps, weight_offset, round_xhat, residual_in_fp32,
                                    store_sum), (0, s_bdim, 0)
    y, s, rstd = ops.add_rms_norm_fwd(x, r, normalized_shape, None, eps, 0.0, round_xhat, residual_in_fp32, store_sum)
    acc = _acc_dtype(x.dtype)
    w = _per_sample_param(weight, w_bdim, x.dim(), len(normalized_shape)).to(acc) + weight_offset
    return ((y.to(acc) * w).to(x.dtype), s, rstd), (0, s_bdim, 0)


@torch.library.register_vmap("fused_norm::add_rms_norm_bwd")
def _add_rms_norm_bwd_vmap(info, in_dims, grad_out, grad_sum, x, residual, normalized_shape, rstd, weight,
                           weight_offset, sum_dtype, residual_dtype):
    dy_bdim, ds_bdim, x_bdim, r_bdim, _, rs_bdim, w_bdim = in_dims[:7]
    B = info.batch_size
    dy, ds, xs, res, rstd = (_to_front(t, d, B) for t, d in (
        (grad_out, dy_bdim), (grad_sum, ds_bdim), (x, x_bdim), (residual, r_bdim), (rstd, rs_bdim)))
    k = len(normalized_shape)
    acc = _acc_dtype(grad_out.dtype)
    if w_bdim is None:
        dx, dres = ops.add_rms_norm_bwd(dy, ds, xs, res, normalized_shape, rstd, weight, weight_offset, sum_dtype,
                                        residual_dtype)[:2]
    else:  # dx depends on the weight only through g = dy * (weight + weight_offset)
        w = _per_sample_param(weight, w_bdim, dy.dim(), k).to(acc) + weight_offset
        dx, dres = ops.add_rms_norm_bwd((dy.to(acc) * w).to(dy.dtype), ds, xs, res, normalized_shape, rstd, None,
                                        0.0, sum_dtype, residual_dtype)[:2]
    lead = tuple(range(1, dy.dim() - k))
    dtype = _param_dtype(grad_out, weight, None)
    dw = None
    if weight is not None:
        dw = _sum_over(dy.to(acc) * (_add_norm_sum(xs, res, sum_dtype, acc).to(acc) * rstd), lead).to(dtype)
    return _add_norm_bwd_outputs(dx, dres, dw, None, grad_out, residual_dtype, dtype, with_bias=False)


# ---------------------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------------------


_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last_3d, torch.channels_last)


def _batch_norm_format(input):
    """Memory format of the forward's output, as the C++ op's output_format() (torch's CPU
    batch_norm's choice): an input dense in the contiguous, channels_last_3d or
    channels_last layout keeps it, any other gets its suggest_memory_format."""
    return next((f for f in _DENSE_FORMATS if input.is_contiguous(memory_format=f)),
                torch._prims_common.suggest_memory_format(input))


def _batch_norm_grad_format(input, grad_out):
    """Memory format of dx, as the C++ ops' grad_format() (torch's CPU backward's choice):
    _batch_norm_format(input) when input and grad_out are both dense in one of those
    layouts with the same suggest_memory_format, else input's suggest_memory_format."""
    suggest = torch._prims_common.suggest_memory_format
    dense = all(any(t.is_contiguous(memory_format=f) for f in _DENSE_FORMATS) for t in (input, grad_out))
    return _batch_norm_format(input) if dense and suggest(input) == suggest(grad_out) else suggest(input)


def _batch_norm_param_dtype(input, *params):
    """dtype of weight, bias and the running statistics: the first one given decides."""
    return next((p.dtype for p in params if p is not None), input.dtype)


@torch.library.register_fake("fused_norm::batch_norm_fwd")
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
                         eps):
    stat = _acc_dtype(input.dtype)
    if input.numel() == 0:  # torch's path for an empty input: no checks, y laid out like the input
        C = input.shape[1] if input.dim() >= 2 else 0
        return torch.empty_like(input), input.new_empty((C,), dtype=stat), input.new_empty((C,), dtype=stat)
    _check_devices(input, weight, bias, running_mean, running_var, num_batches_tracked)
    C = input.shape[1]
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"), (bias, "bias")):
        if t is not None:
            torch._check(t.numel() == C, lambda: f"{name} should contain {C} elements not {t.numel()}")
            torch._check(t.dim() == 1 or name in ("weight", "bias"),
                         lambda: f"{name} should be a 1-D tensor of {C} elements, got shape {list(t.shape)}")
    torch._check(training or running_mean is not None, lambda: "running_mean must be defined in evaluation mode")
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_batch_norm_format(input))
    return y, input.new_empty((C,), dtype=stat), input.new_empty((C,), dtype=stat)


@torch.library.register_fake("fused_norm::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training):
    _check_devices(input, grad_out, weight, bias, save_mean, save_invstd)
    if input.numel() == 0:
        zeros = [torch.zeros_like(t) if t is not None else input.new_empty((0,)) for t in (weight, bias)]
        return torch.empty_like(input), *zeros
    dtype = _batch_norm_param_dtype(input, weight, bias)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                     memory_format=_batch_norm_grad_format(input, grad_out))
    dw = input.new_empty(weight.shape if weight is not None else (0,), dtype=dtype)
    db = input.new_empty(bias.shape if bias is not None else (0,), dtype=dtype)
    return dx, dw, db


def _batch_norm_bwd_math(grad_out, input, weight, bias, save_mean, save_invstd, training):
    """batch_norm_bwd in torch ops, for its autograd (the double backward of batch_norm and
    every higher order); in training the batch statistics are recomputed from the input
    so that their dependence on it is differentiated, eps recovered from the saved
    invstd. In eval the saved statistics are the running ones, constants. An empty input
    (which may be 1-D) has nothing to differentiate."""
    if input.numel() == 0:
        return None, None, None
    acc = _acc_dtype(input.dtype)
    dims = _channel_dims(input)
    dy, x = grad_out.to(acc), input.to(acc)
    if training:
        mu = x.mean(dims, keepdim=True)
        var = (x - mu).square().mean(dims, keepdim=True)
        # r equals the forward's invstd, with var's derivative.
        eps = _per_channel(save_invstd.detach().to(acc), x).pow(-2) - var.detach()
        r = (var + eps).rsqrt()
    else:
        mu = _per_channel(save_mean.to(acc), x)
        r = _per_channel(save_invstd.to(acc), x)
    xhat = (x - mu) * r
    a = r * _per_channel(weight.to(acc), x) if weight is not None else r
    if training:
        dx = a * (dy - dy.mean(dims, keepdim=True) - xhat * (dy * xhat).mean(dims, keepdim=True))
    else:
        dx = a * dy
    dw = (dy * xhat).sum(dims).view(weight.shape).to(weight.dtype) if weight is not None else None
    db = dy.sum(dims).view(bias.shape).to(bias.dtype) if bias is not None else None
    return dx.to(input.dtype), dw, db


torch.library.register_autograd("fused_norm::batch_norm_bwd", _backward_of(_batch_norm_bwd_math),
                                setup_context=_save_inputs)


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
    if n_bdim is not None:  # a factor 1/num_batches_tracked per sample: one call each, on views
        per_sample = [ops.batch_norm_fwd(*(t if d is None or t is None else t.select(d, i) for t, d in
                                           zip((input, weight, bias, running_mean, running_var, num_batches_tracked),
                                               in_dims[:6])), training, momentum, eps) for i in range(B)]
        return tuple(torch.stack(outs) for outs in zip(*per_sample)), (0,) * 3
    if not training and x_bdim is not None and all(d is None for d in in_dims[1:5]):
        x = input.movedim(x_bdim, 0)
        y, mean, invstd = ops.batch_norm_fwd(
            x.reshape(-1, *x.shape[2:]), weight, bias, running_mean, running_var, None, training, momentum, eps)
        return (y.view(x.shape), mean, invstd), (0, None, None)
    stats = [_bn_per_channel(t, d, B) for t, d in ((running_mean, rm_bdim), (running_var, rv_bdim))]
    y, mean, invstd = ops.batch_norm_fwd(
        _bn_channels(input, x_bdim, B), _bn_per_channel(weight, w_bdim, B), _bn_per_channel(bias, b_bdim, B), *stats,
        num_batches_tracked, training, momentum, eps)
    if training and running_mean is not None:
        # The op updated the (B*C,) statistics: a copy where flattening could not view them.
        for t, d, flat in zip((running_mean, running_var), (rm_bdim, rv_bdim), stats):
            _to_front(t, d, B).copy_(flat.view(B, -1))
    outs, dims = zip((_bn_unfold(y, B), 1), *(_bn_samples(t, B) for t in (mean, invstd)))
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
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=_batch_norm_grad_format(input, grad_out))


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


for _name, _math in (("batch_norm_stats", _batch_norm_stats_math),
                     ("batch_norm_bwd_reduce", _batch_norm_bwd_reduce_math),
                     ("batch_norm_bwd_elemt", _batch_norm_bwd_elemt_math)):
    torch.library.register_autograd(f"fused_norm::{_name}", _backward_of(_math), setup_context=_save_inputs)
del _name, _math
