"""Functional forms with the signatures of torch.nn.functional."""

from typing import List, Optional, Union

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from ._ops import ops


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Union[int, List[int], torch.Size],
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
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return ops.layer_norm_fwd(input, list(normalized_shape), weight, bias, eps)[0]


def _verify_batch_size(size) -> None:
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
    """batch_norm with momentum=None meaning the cumulative average 1/num_batches_tracked
    (read from the tensor by the kernel, so that it compiles without a graph break)."""
    if training:
        _verify_batch_size(input.size())
    y, _, _, new_mean, new_var = ops.batch_norm_fwd(
        input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps
    )
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean.view_as(running_mean))
            running_var.copy_(new_var.view_as(running_var))
    return y


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
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, None)
