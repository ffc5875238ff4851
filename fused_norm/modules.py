"""nn.Module drop-ins: subclasses of torch's own modules that run fused_norm's kernels.
Constructor, parameters, state_dict keys, repr and initialization are torch's."""

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .functional import (_batch_norm, _rms_weight, _SyncBatchNorm, add_layer_norm, add_layer_norm_post, add_rms_norm,
                         add_rms_norm_post, layer_norm, rms_norm)


class FusedLayerNorm(nn.LayerNorm):
    r"""Drop-in for :class:`torch.nn.LayerNorm` (same constructor, parameters and
    checkpoints) whose forward runs fused_norm's LayerNorm kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript calls the op (the functional form is Python only)
            return torch.ops.fused_norm.layer_norm_fwd(input, list(self.normalized_shape), self.weight, self.bias,
                                                       self.eps)[0]
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class FusedAddLayerNorm(nn.LayerNorm):
    r"""A :class:`torch.nn.LayerNorm` (same constructor, parameters and checkpoints; an
    instance of it) whose ``forward(input, residual)`` is the pre-norm add-and-norm:
    returns ``(output, new_residual)`` as :func:`fused_norm.add_layer_norm`.
    ``residual_in_fp32`` (keyword, default False) keeps the new residual in float32."""

    def __init__(self, *args, residual_in_fp32: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():  # TorchScript calls the op (the functional form is Python only)
            y, s, _, _ = torch.ops.fused_norm.add_layer_norm_fwd(input, residual, list(self.normalized_shape),
                                                                 self.weight, self.bias, self.eps,
                                                                 self.residual_in_fp32, True)
            return y, s
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
                              residual_in_fp32=self.residual_in_fp32)


class FusedPostAddLayerNorm(nn.LayerNorm):
    r"""A :class:`torch.nn.LayerNorm` whose ``forward(input, residual)`` returns
    ``LayerNorm(input + residual)`` (post-norm, as BERT) in one pass, as
    :func:`fused_norm.add_layer_norm_post`; the sum is not stored."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fused_norm.add_layer_norm_fwd(input, residual, list(self.normalized_shape), self.weight,
                                                           self.bias, self.eps, False, False)[0]
        return add_layer_norm_post(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)
class FusedRMSNorm(nn.RMSNorm):
    r"""Drop-in for :class:`torch.nn.RMSNorm` (same constructor, parameters and
    checkpoints) whose forward runs fused_norm's RMSNorm kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript calls the op (the functional form is Python only)
            eps = self.eps if self.eps is not None else _machine_eps(x.dtype)
            return torch.ops.fused_norm.rms_norm_fwd(x, list(self.normalized_shape), self.weight, eps)[0]
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class FusedAddRMSNorm(nn.RMSNorm):
    r"""A :class:`torch.nn.RMSNorm` (same constructor, parameters and checkpoints; an
    instance of it) whose ``forward(input, residual)`` is the pre-norm add-and-norm:
    returns ``(output, new_residual)`` as :func:`fused_norm.add_rms_norm`.
    ``residual_in_fp32`` (keyword, default False) keeps the new residual in float32."""

    def __init__(self, *args, residual_in_fp32: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            y, s, _ = torch.ops.fused_norm.add_rms_norm_fwd(
                input, residual, list(self.normalized_shape), _rms_weight(input, self.weight),
                _add_rms_eps(self.eps, input, residual, self.residual_in_fp32), 0.0, False, self.residual_in_fp32,
                True)
            return y, s
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                            residual_in_fp32=self.residual_in_fp32)


class FusedPostAddRMSNorm(nn.RMSNorm):
    r"""A :class:`torch.nn.RMSNorm` whose ``forward(input, residual)`` returns
    ``RMSNorm(input + residual)`` in one pass, as :func:`fused_norm.add_rms_norm_post`."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return torch.ops.fused_norm.add_rms_norm_fwd(
                input, residual, list(self.normalized_shape), _rms_weight(input, self.weight),
                _add_rms_eps(self.eps, input, residual, False), 0.0, False, False, False)[0]
        return add_rms_norm_post(input, residual, self.normalized_shape, self.weight, self.eps)


def _add_rms_eps(eps: Optional[float], input: torch.Tensor, residual: torch.Tensor, residual_in_fp32: bool) -> float:
    """The eps of an add-RMSNorm module: its own, or (None) the machine epsilon of the sum's
    dtype, as fused_norm.add_rms_norm; in a form TorchScript compiles."""
    if eps is not None:
        return eps
    if residual_in_fp32:
        return _machine_eps(torch.float32)
    return _machine_eps(torch.promote_types(input.dtype, residual.dtype))


def _machine_eps(dtype: torch.dtype) -> float:
    """torch.finfo(dtype).eps of the kernels' dtypes, in a form TorchScript compiles."""
    if dtype == torch.float64:
        return 2.220446049250313e-16
    if dtype == torch.float16:
        return 0.0009765625
    if dtype == torch.bfloat16:
        return 0.0078125
    return 1.1920928955078125e-07


class _FusedBatchNormForward:
    """forward of torch's _BatchNorm, on fused_norm's kernels. momentum=None passes
    num_batches_tracked to the op, which reads the cumulative-average factor from it."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum: Optional[float] = self.momentum
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


class FusedSyncBatchNorm(_FusedBatchNormForward, nn.SyncBatchNorm):
    r"""Drop-in for :class:`torch.nn.SyncBatchNorm` (same constructor, parameters, buffers,
    checkpoints and input checks) running fused_norm's BatchNorm kernels.

    In training, with torch.distributed initialized and a process group of more than one
    rank, the batch statistics are those of all the ranks' batches together (batch sizes
    may differ, a batch may be empty), on CPU tensors (gloo) as well as CUDA ones (NCCL);
    see fused_norm.functional._SyncBatchNorm for how. Otherwise (eval mode, no process
    group, a group of one) it computes exactly what FusedBatchNorm1d/2d/3d does.
    Every rank of the group must run the forward (and the backward) of the layer.
    """

    def _sync_group(self):
        """The process group to synchronize over, or None for an unsynchronized forward."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        track = self.track_running_stats
        return _SyncBatchNorm.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.momentum,
            self.eps,
            group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        r"""Returns `module` with every BatchNorm layer in it (``torch.nn.BatchNorm1d/2d/3d``,
        ``FusedBatchNorm1d/2d/3d``, ``SyncBatchNorm``: any ``_BatchNorm``) replaced by a
        FusedSyncBatchNorm that synchronizes over `process_group` (default: the whole
        world), like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: a new layer
        holds the old one's Parameter and buffer objects themselves (shared, not copied),
        its training flag and qconfig. A BatchNorm `module` itself comes back as a new
        FusedSyncBatchNorm. New layers are built on the meta device, so nothing is
        allocated (or initialized) for the tensors they take over."""
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name, child in list(module.named_children()):
                module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
            return module
        sync = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                   process_group, device="meta", bias=module.bias is not None)
        shared = ("weight", "bias") if module.affine else ()
        for name in shared + ("running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(module, name))
        sync.training = module.training
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        for name, child in module.named_children():
            sync.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return sync
