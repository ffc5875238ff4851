"""convert_model: switch the LayerNorm / BatchNorm layers of an existing model to
fused_norm's modules, in place; fuse_add_norm: fuse the residual adds of a Hugging Face
BERT into its LayerNorms."""

import warnings

from torch import nn

from .functional import add_layer_norm_post
from .modules import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedLayerNorm

# Exact torch class -> fused class. Each fused class subclasses its torch class and only
# overrides forward: an instance of the torch class has every attribute the fused class
# needs, so changing the instance's class is the whole conversion.
_FUSED = {
    nn.LayerNorm: FusedLayerNorm,
    nn.BatchNorm1d: FusedBatchNorm1d,
    nn.BatchNorm2d: FusedBatchNorm2d,
    nn.BatchNorm3d: FusedBatchNorm3d,
}


def convert_model(model: nn.Module) -> nn.Module:
    r"""Makes every :class:`torch.nn.LayerNorm` and :class:`torch.nn.BatchNorm1d` /
    ``BatchNorm2d`` / ``BatchNorm3d`` in ``model`` (``model`` itself included, at any
    depth, shared modules once) run fused_norm's kernels, in place, and returns ``model``.

    Each such module becomes an instance of :class:`FusedLayerNorm` /
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


# ---------------------------------------------------------------------------------------
# Residual add + norm in model code: the add-and-norm of a transformer block is inside a
# layer's forward (BERT's BertSelfOutput: `self.LayerNorm(hidden_states + input_tensor)`),
# not a module of its own, so fusing it means another forward for that layer class.


def _bert_add_norm_forward(self, hidden_states, input_tensor):
    """BertSelfOutput.forward / BertOutput.forward (transformers' modeling_bert) with the
    residual add fused into the LayerNorm. Where the two dtypes differ (under autocast,
    say), the unfused expression runs, whose sum promotes to the wider dtype."""
    hidden_states = self.dropout(self.dense(hidden_states))
    if hidden_states.dtype != input_tensor.dtype:
        return self.LayerNorm(hidden_states + input_tensor)
    ln = self.LayerNorm
    return add_layer_norm_post(hidden_states, input_tensor, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _known_add_norm_classes():
    """{layer class: its fused subclass} for the model code this module knows (and can
    import): transformers' BertSelfOutput and BertOutput."""
    try:
        from transformers.models.bert import modeling_bert
    except ImportError:
        return {}
    known = {}
    for cls in (modeling_bert.BertSelfOutput, modeling_bert.BertOutput):
        known[cls] = _FUSED_ADD_NORM.get(cls) or type(f"FusedAddNorm{cls.__name__}", (cls,), {
            "forward": _bert_add_norm_forward, "__module__": __name__,
            "__doc__": f"{cls.__name__} whose residual add runs fused into its LayerNorm (fuse_add_norm)."})
    _FUSED_ADD_NORM.update(known)
    return known


_FUSED_ADD_NORM = {}  # the classes made so far: one per layer class, so instances share it


def fuse_add_norm(model: nn.Module) -> nn.Module:
    r"""Makes the post-norm residual add-and-norm layers of a Hugging Face BERT
    (``transformers``' ``BertSelfOutput`` and ``BertOutput``, anywhere in ``model``) compute
    ``LayerNorm(hidden_states + input_tensor)`` with :func:`fused_norm.add_layer_norm_post`,
    in place, and returns ``model``.

    As :func:`convert_model` does for norm layers, it changes the class of each such
    layer to a subclass whose only difference is ``forward`` (the same dense, dropout and
    LayerNorm, then the fused add and norm); parameters, ``state_dict`` keys and every
    reference to the layer stay as they were. Left alone: every other class (subclasses of
    those two included), and layers whose ``LayerNorm`` is not a plain
    :class:`torch.nn.LayerNorm` (or :class:`FusedLayerNorm`) or whose ``forward`` was
    replaced on the instance. Call :func:`convert_model` too for the model's other
    LayerNorms (the embeddings')."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_add_norm expects a torch.nn.Module, got {type(model).__name__}")
    known = _known_add_norm_classes()
    for module in model.modules():
        fused = known.get(type(module))
        if (fused is not None and "forward" not in vars(module)
                and type(getattr(module, "LayerNorm", None)) in (nn.LayerNorm, FusedLayerNorm)):
            module.__class__ = fused
    return model
