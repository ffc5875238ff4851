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
