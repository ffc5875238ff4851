"""fused_norm: fused LayerNorm and BatchNorm kernels for PyTorch.

The ops live in the ``torch.ops.fused_norm`` namespace (CPU and, when built with CUDA,
CUDA kernels), with fake kernels and autograd so that ``torch.compile`` traces them.
``layer_norm`` mirrors ``torch.nn.functional.layer_norm``; ``FusedLayerNorm`` is a
``torch.nn.LayerNorm`` subclass; ``rms_norm`` and ``FusedRMSNorm`` are the same for
``torch.nn.functional.rms_norm`` / ``torch.nn.RMSNorm``. ``batch_norm`` mirrors ``torch.nn.functional.batch_norm``;
``FusedBatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d``, and
``FusedSyncBatchNorm`` ``torch.nn.SyncBatchNorm`` (statistics synchronized through
torch.distributed, on CPU/gloo as well as CUDA/NCCL). ``convert_model`` switches the
torch norm layers of an existing model to the fused modules, in place.
"""

from . import _ops  # noqa: F401  (registers the ops, fake kernels and autograd)
from ._ops import cpu_capability, set_cpu_capability
from .convert import convert_model
from .functional import batch_norm, layer_norm, rms_norm
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedLayerNorm, FusedRMSNorm,
                      FusedSyncBatchNorm)

__all__ = [
    "layer_norm",
    "FusedLayerNorm",
    "rms_norm",
    "FusedRMSNorm",
    "batch_norm",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "FusedSyncBatchNorm",
    "convert_model",
    "cpu_capability",
    "set_cpu_capability",
]
__version__ = "0.1.0"
