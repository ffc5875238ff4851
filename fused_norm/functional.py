"""Functional forms with the signatures of torch.nn.functional."""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.overrides import handle_torch_function, has_torch_function_variadic

from ._ops import AddLayerNormFunction, AddRMSNormFunction, _acc_dtype, functorch_active, ops


def _raise_type_error(fn, args):
    """torch's TypeError (its argument parser's) for the first argument of a wrong type
    among args, (name, value, kind) in the function's order with kind "Tensor",
    "Tensor?", "ints" or "float". The ops' schema checks raise RuntimeErrors instead, so
    the functions call this when the op refuses their arguments."""
    def type_name(v):
        t = type(v)
        return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"

    for pos, (name, value, kind) in enumerate(args, 1):
        where = f"{fn}(): argument '{name}' (position {pos}) must be"
        if kind == "ints":
            if not isinstance(value, (tuple, list)):  # torch.Size is a tuple
                raise TypeError(f"{where} tuple of ints, not {type_name(value)}")
            for i, v in enumerate(value):
                if not isinstance(v, (int, torch.SymInt)):
                    raise TypeError(f"{where} tuple of ints, but found element of type {type_name(v)} at pos {i}")
        elif kind == "float":
            if not isinstance(value, (int, float)):
                raise TypeError(f"{where} float, not {type_name(value)}")
        elif not isinstance(value, torch.Tensor) and not (kind == "Tensor?" and value is None):
            raise TypeError(f"{where} Tensor, not {type_name(value)}")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dims, as
    :func:`torch.nn.functional.layer_norm`, computed by fused_norm's kernels."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            layer_norm, (input, weight, bias), input, normalized_shape, weight=weight, bias=bias, eps=eps
        )
    try:
        return ops.layer_norm_fwd(input, list(normalized_shape), weight, bias, eps)[0]
    except (RuntimeError, TypeError):
        _raise_type_error("layer_norm", (("input", input, "Tensor"), ("normalized_shape", normalized_shape, "ints"),
                                         ("weight", weight, "Tensor?"), ("bias", bias, "Tensor?"),
                                         ("eps", eps, "float")))
        raise


def _add_layer_norm(fn, input, residual, normalized_shape, weight, bias, eps, residual_in_fp32, store_sum):
    try:
        args = (input, residual, list(normalized_shape), weight, bias, eps, residual_in_fp32, store_sum)
        return AddLayerNormFunction.apply(*args) if functorch_active() else ops.add_layer_norm_fwd(*args)
    except (RuntimeError, TypeError):
        _raise_type_error(fn, (("input", input, "Tensor"), ("residual", residual, "Tensor"),
                               ("normalized_shape", normalized_shape, "ints"), ("weight", weight, "Tensor?"),
                               ("bias", bias, "Tensor?"), ("eps", eps, "float")))
        raise


def add_layer_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    residual_in_fp32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The residual add and LayerNorm of a pre-norm transformer block in one pass:
    returns ``(output, new_residual)`` with

    - ``new_residual = input + residual``, added in float32 (float64 for float64) and
      stored in ``residual``'s dtype, or in float32 when ``residual_in_fp32``;
    - ``output = layer_norm(new_residual, normalized_shape, weight, bias, eps)`` in
      ``input``'s dtype.

    ``residual`` has ``input``'s shape, device and dtype, or float32 for float16/bfloat16
    ``input`` (a float32 residual stream). Nothing is updated in place; both outputs are
    new tensors. Differentiable w.r.t. input, residual, weight and bias, with gradients
    from both outputs."""
    if has_torch_function_variadic(input, residual, weight, bias):
        return handle_torch_function(add_layer_norm, (input, residual, weight, bias), input, residual,
                                     normalized_shape, weight=weight, bias=bias, eps=eps,
                                     residual_in_fp32=residual_in_fp32)
    y, s = _add_layer_norm("add_layer_norm", input, residual, normalized_shape, weight, bias, eps,
                           residual_in_fp32, True)[:2]
    return y, s


def add_layer_norm_post(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    residual_in_fp32: bool = False,
) -> torch.Tensor:
    r"""``layer_norm(input + residual, ...)``, the add-and-norm of a post-norm block
    (BERT's ``LayerNorm(hidden_states + input_tensor)``): :func:`add_layer_norm`'s
    ``output`` alone, without writing the sum (two reads and one write). The sum is
    rounded to ``residual``'s dtype before it is normalized, as in the unfused
    expression; ``residual_in_fp32`` normalizes the float32 sum instead."""
    if has_torch_function_variadic(input, residual, weight, bias):
        return handle_torch_function(add_layer_norm_post, (input, residual, weight, bias), input, residual,
                                     normalized_shape, weight=weight, bias=bias, eps=eps,
                                     residual_in_fp32=residual_in_fp32)
    return _add_layer_norm("add_layer_norm_post", input, residual, normalized_shape, weight, bias, eps,
                           residual_in_fp32, False)[0]


def _rms_weight(input: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The weight as the kernels take it: input's dtype or, for float16/bfloat16 input,
    float32. torch's rms_norm accepts any floating weight (it multiplies the float32, or
    float64, normalized input by it and rounds to input's dtype): other dtypes are cast to
    the input's accumulation dtype, which is exact for a narrower weight; a float64
    weight of a float32/16-bit input is rounded to float32 first. TorchScript compiles it
    (the add-RMSNorm modules' scripted forward)."""
    if weight is None or weight.dtype == input.dtype or not weight.is_floating_point() \
            or not input.is_floating_point():
        return weight
    if weight.dtype == torch.float32 and (input.dtype == torch.float16 or input.dtype == torch.bfloat16):
        return weight
    return weight.to(_acc_dtype(input.dtype))


def rms_norm(
    input: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
) -> torch.Tensor:
    r"""Root mean square normalization over the trailing ``normalized_shape`` dims, as
    :func:`torch.nn.functional.rms_norm` (``eps=None``: ``torch.finfo(input.dtype).eps``),
    computed by fused_norm's kernels."""
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(rms_norm, (input, weight), input, normalized_shape, weight=weight, eps=eps)
    try:
        if input.dim() < len(normalized_shape):  # torch's check, before the shape's
            raise ValueError(f"Input tensor must have at least {len(normalized_shape)} dimensions, but got "
                             f"{input.dim()}")
        if eps is None:
            eps = torch.finfo(input.dtype).eps if input.is_floating_point() else 0.0
        return ops.rms_norm_fwd(input, list(normalized_shape), _rms_weight(input, weight), eps)[0]
    except (RuntimeError, TypeError, AttributeError):
        _raise_type_error("rms_norm", (("input", input, "Tensor"), ("normalized_shape", normalized_shape, "ints"),
                                       ("weight", weight, "Tensor?"), ("eps", 0.0 if eps is None else eps, "float")))
        raise


def _add_rms_norm(fn, input, residual, normalized_shape, weight, eps, residual_in_fp32, store_sum, round_xhat=False):
    try:
        if eps is None:  # torch's rms_norm of the sum: the machine epsilon of the sum's dtype
            eps = torch.finfo(torch.float32 if residual_in_fp32 else torch.promote_types(input.dtype,
                                                                                         residual.dtype)).eps
        args = (input, residual, list(normalized_shape), _rms_weight(input, weight), eps, 0.0, round_xhat,
                residual_in_fp32, store_sum)
        return AddRMSNormFunction.apply(*args) if functorch_active() else ops.add_rms_norm_fwd(*args)
    except (RuntimeError, TypeError, AttributeError):
        _raise_type_error(fn, (("input", input, "Tensor"), ("residual", residual, "Tensor"),
                               ("normalized_shape", normalized_shape, "ints"), ("weight", weight, "Tensor?"),
                               ("eps", 0.0 if eps is None else eps, "float")))
        raise


def add_rms_norm(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual_in_fp32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The residual add and RMSNorm of a pre-norm block (Llama's) in one pass: returns
    ``(output, new_residual)``, ``new_residual = input + residual`` as in
    :func:`add_layer_norm` and ``output = rms_norm(new_residual, normalized_shape, weight,
    eps)`` in ``input``'s dtype (``eps=None``: the machine epsilon of the sum's dtype, as
    :func:`torch.nn.functional.rms_norm`)."""
    if has_torch_function_variadic(input, residual, weight):
        return handle_torch_function(add_rms_norm, (input, residual, weight), input, residual, normalized_shape,
                                     weight=weight, eps=eps, residual_in_fp32=residual_in_fp32)
    y, s = _add_rms_norm("add_rms_norm", input, residual, normalized_shape, weight, eps, residual_in_fp32, True)[:2]
    return y, s


def add_rms_norm_post(
    input: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual_in_fp32: bool = False,
) -> torch.Tensor:
    r"""``rms_norm(input + residual, ...)`` without writing the sum: :func:`add_rms_norm`'s
    ``output`` alone."""
    if has_torch_function_variadic(input, residual, weight):
        return handle_torch_function(add_rms_norm_post, (input, residual, weight), input, residual,
                                     normalized_shape, weight=weight, eps=eps, residual_in_fp32=residual_in_fp32)
    return _add_rms_norm("add_rms_norm_post", input, residual, normalized_shape, weight, eps, residual_in_fp32,
                         False)[0]


def _verify_batch_size(size: List[int]) -> None:
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool,
                momentum: Optional[float], eps: float, num_batches_tracked: Optional[torch.Tensor]) -> torch.Tensor:
    """batch_norm with momentum=None meaning the cumulative average 1/num_batches_tracked
    (read from the tensor by the kernel, so that it compiles without a graph break). The
    op updates the running statistics in place. TorchScript compiles it (the modules'
    forward)."""
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    return torch.ops.fused_norm.batch_norm_fwd(
        input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps)[0]


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch normalization over dim 1, as :func:`torch.nn.functional.batch_norm`
    (including the in-place update of ``running_mean``/``running_var`` when training),
    computed by fused_norm's kernels."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean, running_var,
            weight=weight, bias=bias, training=training, momentum=momentum, eps=eps,
        )
    if momentum is None:  # torch.nn.functional.batch_norm has no cumulative average
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not {type(momentum).__name__}")
    try:
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None)
    except RuntimeError:
        _raise_type_error("batch_norm", (
            ("input", input, "Tensor"), ("running_mean", running_mean, "Tensor?"),
            ("running_var", running_var, "Tensor?"), ("weight", weight, "Tensor?"), ("bias", bias, "Tensor?")))
        raise


class _SyncBatchNorm(torch.autograd.Function):
    """Training batch_norm over the union of the batches of the ranks of `process_group`
    (FusedSyncBatchNorm's synchronized path; every rank must call it, in the same order).

    Forward: each rank's per-channel mean and biased variance (batch_norm_stats, exact
    moments) and its count are all-gathered as float64 and merged with Chan's formula
    (global mean = sum n_i mean_i / n; M2 = sum n_i (var_i + (mean_i - mean)^2)), which
    is exact for any mix of batch sizes: a rank with an empty batch sends count 0 and
    zeros and adds nothing. (An all_reduce of sum(x) and sum(x^2) would cost the same
    traffic but lose the variance to cancellation when |mean| >> std.) Every rank merges
    the same gathered values in the same order, so all get bitwise the same statistics,
    and the same running-statistic updates. Then batch_norm_fwd in eval mode, with the
    global mean and variance as its "running" statistics, normalizes.
    Backward: batch_norm_bwd_reduce's local sum(dy) and sum(dy * (x - mean)), one
    all_reduce of both (concatenated), then batch_norm_bwd_elemt with the global count.
    dweight/dbias are left per-rank (from the local sums), for DDP to all-reduce, as in
    torch.nn.SyncBatchNorm.

    The global count stays on the device; it is read on the host (which waits for the
    collective) only on a rank holding at most one value per channel, the only case in
    which the global count can be 0 or 1."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                process_group):
        C = input.shape[1]
        n_local = input.numel() // C
        if n_local > 0:
            mean, var = ops.batch_norm_stats(input)
            local = torch.cat([mean.double(), var.double(), mean.new_full((1,), n_local, dtype=torch.float64)])
        else:
            local = input.new_zeros(2 * C + 1, dtype=torch.float64)
        world_size = dist.get_world_size(process_group)
        gathered = local.new_empty(world_size * (2 * C + 1))
        dist.all_gather_single(gathered, local, group=process_group)
        mean_all, var_all, count_all = gathered.view(world_size, 2 * C + 1).split([C, C, 1], dim=1)
        count = count_all.sum()
        update = running_mean is not None
        if n_local <= 1:
            total = int(count.item())
            if total == 1:
                raise ValueError("Expected more than 1 value per channel when training, got input size "
                                 f"{input.size()} on this rank and 1 value per channel over the process group")
            update = update and total > 0  # all batches empty: the running statistics stay
        mean = (count_all * mean_all).sum(0) / count
        var = (count_all * (var_all + (mean_all - mean).square())).sum(0) / count

        if update:
            f = num_batches_tracked.double().reciprocal() if momentum is None else momentum
            running_mean.copy_(running_mean.double() * (1 - f) + mean * f)
            running_var.copy_(running_var.double() * (1 - f) + var * (count / (count - 1)) * f)

        # fp16/bf16 parameters normalize through exact float32 copies, so that the global
        # statistics can be passed in float32; other dtype mixes go to the op's checks.
        params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
        stat_type = params[0].dtype if params else input.dtype
        ctx.param_dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
        if stat_type == input.dtype != _acc_dtype(input.dtype) and all(t.dtype == stat_type for t in params):
            stat_type = torch.float32
            weight = weight.float() if weight is not None else None
            bias = bias.float() if bias is not None else None
        y, save_mean, save_invstd = ops.batch_norm_fwd(
            input, weight, bias, mean.to(stat_type), var.to(stat_type), None, False, 0.0, eps)
        ctx.process_group = process_group
        ctx.save_for_backward(input, weight, save_mean, save_invstd, count.to(torch.int64).reshape(1))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, mean, invstd, count = ctx.saved_tensors
        C = input.shape[1]
        local = input.numel() > 0
        if local:
            sum_dy, sum_dy_xmu = ops.batch_norm_bwd_reduce(grad_out, input, mean)
        else:  # no values here, but the all_reduce needs every rank
            sum_dy = sum_dy_xmu = mean.new_zeros(C)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.process_group)
            grad_input = ops.batch_norm_bwd_elemt(grad_out, input, weight, mean, invstd, sums[:C], sums[C:], count)
        # Zeros, not None, from an empty batch: DDP waits for every parameter's gradient.
        weight_dtype, bias_dtype = ctx.param_dtypes
        if ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd if local else sum_dy_xmu).to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None
