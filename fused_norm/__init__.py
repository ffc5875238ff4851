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
``add_layer_norm`` / ``add_layer_norm_post`` (modules ``FusedAddLayerNorm`` /
``FusedPostAddLayerNorm``) and ``add_rms_norm`` / ``add_rms_norm_post`` (``FusedAddRMSNorm`` /
``FusedPostAddRMSNorm``) fuse a transformer block's residual add into the norm;
``fuse_add_norm`` makes Hugging Face BERT and Llama layers use them.
"""

from . import _ops  # noqa: F401  (registers the ops, fake kernels and autograd)
from ._ops import cpu_capability, set_cpu_capability
from .convert import convert_model, fuse_add_norm
from .functional import (add_layer_norm, add_layer_norm_post, add_rms_norm, add_rms_norm_post, batch_norm,
                         layer_norm, rms_norm)
from .modules import (FusedAddLayerNorm, FusedAddRMSNorm, FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d,
                      FusedLayerNorm, FusedPostAddLayerNorm, FusedPostAddRMSNorm, FusedRMSNorm, FusedSyncBatchNorm)

__all__ = [
    "layer_norm",
    "FusedLayerNorm",
    "add_layer_norm",
    "add_layer_norm_post",
    "FusedAddLayerNorm",
    "FusedPostAddLayerNorm",
    "rms_norm",
    "FusedRMSNorm",
    "add_rms_norm",
    "add_rms_norm_post",
    "FusedAddRMSNorm",
    "FusedPostAddRMSNorm",
    "batch_norm",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "FusedSyncBatchNorm",
    "convert_model",
    "fuse_add_norm",
    "cpu_capability",
    "set_cpu_capability",
]
__version__ = "0.1.0"
