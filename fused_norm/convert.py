"""convert_model: switch the LayerNorm / RMSNorm / BatchNorm layers of an existing model to
fused_norm's modules, in place."""

import warnings

from torch import nn

from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedLayerNorm, FusedRMSNorm

# Exact torch class -> fused class. Each fused class subclasses its torch class and only
# overrides forward: an instance of the torch class has every attribute the fused class
# needs, so changing the instance's class is the whole conversion.
_FUSED = {
    nn.LayerNorm: FusedLayerNorm,
    nn.RMSNorm: FusedRMSNorm,
    nn.BatchNorm1d: FusedBatchNorm1d,
    nn.BatchNorm2d: FusedBatchNorm2d,
    nn.BatchNorm3d: FusedBatchNorm3d,
}


def convert_model(model: nn.Module) -> nn.Module:
    r"""Makes every :class:`torch.nn.LayerNorm`, :class:`torch.nn.RMSNorm` and :class:`torch.nn.BatchNorm1d` /
    ``BatchNorm2d`` / ``BatchNorm3d`` in ``model`` (``model`` itself included, at any
    depth, shared modules once) run fused_norm's kernels, in place, and returns ``model``.

    Each such module becomes an instance of :class:`FusedLayerNorm` / :class:`FusedRMSNorm` /
    :class:`FusedBatchNorm1d` / ``2d`` / ``3d`` by changing its class; the object itself
    is kept. So everything about it stays as it was: its options (``eps``, ``momentum``
    including ``None``, ``affine`` / ``elementwise_affine``, ``bias``,
    ``track_running_stats``, ``normalized_shape``, ``num_features``), the very same
    Parameter and buffer objects (an optimizer built before the conversion keeps
    working), ``state_dict`` keys, training/eval mode, device and dtype, hooks, other
    attributes, and every reference to it held elsewhere. ``convert_model(m) is m``,
    also when ``m`` is itself a norm layer.

    Left alone:

    - subclasses of these classes (a user's ``class MyNorm(nn.LayerNorm)``, classes made
      by ``torch.nn.utils.parametrize``, ``nn.LazyBatchNorm2d`` before its first forward),
      since their behaviour may differ from the torch class; ``nn.SyncBatchNorm``;
      modules that are already fused;
    - a module whose ``forward`` was replaced on the instance (by a wrapping library, for
      instance), since that replacement would still run instead of the fused forward; a
      warning names it.

    The fused modules run on CPU and CUDA tensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model expects a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        fused = _FUSED.get(type(module))
        if fused is None:
            continue
        if "forward" in vars(module):
            warnings.warn(
                f"fused_norm.convert_model: left {name or 'the model'} ({type(module).__name__}) unconverted: "
                "its forward is replaced on the instance",
                stacklevel=2,
            )
            continue
        module.__class__ = fused
    return model
