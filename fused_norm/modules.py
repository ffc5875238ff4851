"""nn.Module drop-ins: subclasses of torch's own modules that run fused_norm's kernels.
Constructor, parameters, state_dict keys, repr and initialization are torch's."""

import torch
from torch import nn

from .functional import _batch_norm, layer_norm


class FusedLayerNorm(nn.LayerNorm):
    r"""Drop-in for :class:`torch.nn.LayerNorm` (same constructor, parameters and
    checkpoints) whose forward runs fused_norm's LayerNorm kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _FusedBatchNormForward:
    """forward of torch's _BatchNorm, on fused_norm's kernels. momentum=None passes
    num_batches_tracked to the op, which reads the cumulative-average factor from it."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        elif momentum is None:
            momentum = 0.0
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
            self.num_batches_tracked,
        )


class FusedBatchNorm1d(_FusedBatchNormForward, nn.BatchNorm1d):
    r"""Drop-in for :class:`torch.nn.BatchNorm1d` running fused_norm's BatchNorm kernels."""


class FusedBatchNorm2d(_FusedBatchNormForward, nn.BatchNorm2d):
    r"""Drop-in for :class:`torch.nn.BatchNorm2d` running fused_norm's BatchNorm kernels."""


class FusedBatchNorm3d(_FusedBatchNormForward, nn.BatchNorm3d):
    r"""Drop-in for :class:`torch.nn.BatchNorm3d` running fused_norm's BatchNorm kernels."""
