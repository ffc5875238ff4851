"""nn.Module drop-ins: subclasses of torch's own modules that run fused_norm's kernels.
Constructor, parameters, state_dict keys, repr and initialization are torch's."""

import torch
from torch import nn

from .functional import layer_norm


class FusedLayerNorm(nn.LayerNorm):
    r"""Drop-in for :class:`torch.nn.LayerNorm` (same constructor, parameters and
    checkpoints) whose forward runs fused_norm's LayerNorm kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
