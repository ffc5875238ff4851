"""convert_model: switch the LayerNorm / RMSNorm / BatchNorm layers of an existing model
to fused_norm's modules, in place, including the RMSNorm classes of Hugging Face's model
families (Llama and its copies, Gemma); fuse_add_norm: fuse the residual adds of Hugging
Face BERT and Llama layers into their norms."""

import copy
import warnings

import torch
from torch import nn

from .functional import _add_rms_norm, add_layer_norm_post
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


# ---------------------------------------------------------------------------------------
# RMSNorm classes defined by model code (Hugging Face's LlamaRMSNorm and its many copies,
# GemmaRMSNorm, ...). Such a class is recognized by its structure (a 1-D `weight`
# parameter, an `eps` or `variance_epsilon` float, no buffers or submodules) and by what
# its forward computes: on small random inputs in float64, float32 and bfloat16 (random
# weights, magnitudes at which eps matters) its output must equal, bit for bit, one of
# these formulas written in torch ops (x_hat = x * rsqrt(mean(x^2) + eps), computed in
# float32 from x.float()):
#   "llama": weight * x_hat.to(x.dtype)                     (kernel: round_xhat)
#   "gemma": (x_hat * (1 + weight.float())).to(x.dtype)     (kernel: weight_offset 1)
#   "plain": (x_hat * weight.float()).to(x.dtype)           (torch's rms_norm)
# A matching class is converted to a subclass of it (cached per class) whose forward
# runs the kernel with that option; a class named like an RMSNorm that matches none is
# left alone with a warning.

_EPS_ATTRS = ("variance_epsilon", "eps")
_HF_MODES = {"llama": (0.0, True), "gemma": (1.0, False), "plain": (0.0, False)}


def _eps_attr(module):
    return next((a for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)


def _rms_structure(module):
    """Whether module is shaped like an RMSNorm: one parameter, a 1-D weight; an eps."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    return (list(params) == ["weight"] and weight.dim() == 1 and not list(module.buffers())
            and not list(module.children()) and _eps_attr(module) is not None)


def _hf_formula(mode, x, weight, eps):
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "llama":
        return weight * xhat.to(x.dtype)
    offset = 1.0 if mode == "gemma" else 0.0
    return (xhat * (offset + weight.float())).to(x.dtype)


def _probe_mode(module):
    """The mode whose formula module's class computes, or None."""
    cls = type(module)
    n = module.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, n, generator=g, dtype=torch.float64) * torch.logspace(-4, 1, 4, dtype=torch.float64)[:, None]
    w64 = torch.randn(n, generator=g, dtype=torch.float64)
    try:
        probe = copy.deepcopy(module).to("cpu")
    except Exception:  # noqa: BLE001  (a module that cannot be copied is not probed)
        return None
    eps = getattr(probe, _eps_attr(probe))
    outs = {}
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            probe.to(dtype)
            probe.weight.copy_(w64)
            x = x64.to(dtype)
            try:
                outs[dtype] = (cls.forward(probe, x), x, probe.weight.detach().clone())
            except Exception:  # noqa: BLE001
                return None
        for mode in _HF_MODES:
            if all(torch.equal(y, _hf_formula(mode, x, w, eps)) for y, x, w in outs.values()):
                return mode
    return None


def _fused_hf_forward(self, hidden_states):
    """The forward of a converted Hugging Face RMSNorm: its class's formula (_HF_MODES)
    on fused_norm's kernel, over the last dim, computed in float32 (float64 input too,
    as the model code's x.float())."""
    offset, round_xhat = _HF_MODES[type(self)._fused_norm_mode]
    eps = getattr(self, _eps_attr(self))
    x, w = hidden_states, self.weight
    n = [x.shape[-1]]
    xk = x.float() if x.dtype == torch.float64 else x
    if round_xhat:  # weight * x_hat.to(x.dtype), the product in the promoted dtype
        if w.dtype == x.dtype and xk is x:
            return torch.ops.fused_norm.rms_norm_fwd(x, n, w, eps, 0.0, True)[0]
        return w * torch.ops.fused_norm.rms_norm_fwd(xk, n, None, eps)[0].to(x.dtype)
    wk = w if w.dtype == xk.dtype or (w.dtype == torch.float32 and xk.dtype != torch.float32) else w.float()
    return torch.ops.fused_norm.rms_norm_fwd(xk, n, wk, eps, offset)[0].to(x.dtype)


_HF_FUSED = {}  # model class -> its fused subclass, or None (not an RMSNorm we convert)


def _hf_fused_class(module):
    cls = type(module)
    if cls not in _HF_FUSED:
        mode = _probe_mode(module)
        fused = None
        if mode is not None:
            name = f"Fused{cls.__name__}"
            fused = type(name, (cls,), {"forward": _fused_hf_forward, "_fused_norm_mode": mode,
                                        "__module__": __name__, "__qualname__": f"_hf_classes.{name}_{id(cls):x}"})
            # reachable by its qualified name, so that converted models pickle
            setattr(_hf_classes, f"{name}_{id(cls):x}", fused)
        _HF_FUSED[cls] = fused
    return _HF_FUSED[cls]


class _HFClassesNamespace(type):
    def __getattr__(cls, name):
        # A fused add-norm class (fuse_add_norm) this process has not made yet, looked up
        # by unpickling a model converted in another one: made now (it depends only on the
        # layer class), so the model loads wherever transformers imports.
        if name.startswith(_ADD_NORM_PREFIX):
            _known_add_norm_classes()
            if name in vars(cls):
                return vars(cls)[name]
        raise AttributeError(f"type object '_hf_classes' has no attribute '{name}'")


class _hf_classes(metaclass=_HFClassesNamespace):
    """Namespace of the generated subclasses (see _hf_fused_class and
    _known_add_norm_classes): they pickle by their qualified name in it."""


def _rms_candidate(module):
    """Whether module looks like a model's own RMSNorm (by name, or by structure and a
    name with "norm" in it); nn.RMSNorm and fused classes are handled elsewhere."""
    cls = type(module)
    if cls in _FUSED or cls in _FUSED.values() or getattr(cls, "_fused_norm_mode", None) or \
            isinstance(module, (nn.RMSNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
        return False
    name = cls.__name__.lower()
    return "rmsnorm" in name or ("norm" in name and _rms_structure(module))


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

    RMSNorm classes of model code, such as Hugging Face's ``LlamaRMSNorm`` (and the
    classes copied from it: Mistral, Qwen2, Qwen3, ...) and ``GemmaRMSNorm`` /
    ``Gemma2RMSNorm`` / ``Gemma3RMSNorm``, become a subclass of their class whose forward
    runs fused_norm's RMSNorm kernel with the class's own dtype semantics (Llama: the
    normalized input rounded to the input's dtype, then times the weight; Gemma:
    ``x_hat * (1 + weight)`` in float32, then rounded). Such a class is recognized by its
    structure and by comparing its forward, bit for bit, with those formulas on small
    random inputs; one that is named like an RMSNorm but matches none is left alone with
    a warning naming it.

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
        if fused is None and _rms_candidate(module):
            fused = _hf_fused_class(module) if _rms_structure(module) else None
            if fused is None:
                warnings.warn(f"fused_norm.convert_model: left {name or 'the model'} ({type(module).__name__}) "
                              "unconverted: not an RMSNorm fused_norm computes exactly (its structure or its "
                              "forward's results differ from the Llama, Gemma and torch formulas)", stacklevel=2)
                continue
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
    residual add fused into the LayerNorm. Where the two dtypes differ (under autocast: the
    dense layer's bfloat16 output and the float32 residual stream), the unfused sum
    promotes to the wider dtype and the norm runs in it: both are cast to it (exactly) and
    fused, unless the LayerNorm's parameters have another dtype, where the unfused
    expression runs."""
    hidden_states = self.dropout(self.dense(hidden_states))
    ln = self.LayerNorm
    if hidden_states.dtype != input_tensor.dtype:
        dtype = torch.promote_types(hidden_states.dtype, input_tensor.dtype)
        if any(p is not None and p.dtype != dtype for p in (ln.weight, ln.bias)):
            return ln(hidden_states + input_tensor)
        hidden_states, input_tensor = hidden_states.to(dtype), input_tensor.to(dtype)
    return add_layer_norm_post(hidden_states, input_tensor, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


_REDUCED = (torch.float16, torch.bfloat16)


def _hooked(*modules):
    """Whether a forward hook (of these modules, or a global one) may see their inputs."""
    from torch.nn.modules import module as _module
    if _module._global_forward_pre_hooks or _module._global_forward_hooks:
        return True
    return any(m._forward_pre_hooks or m._forward_hooks for m in modules)


def _mlp_casts_its_input(mlp, device_type, dtype):
    """Whether the MLP of a LlamaDecoderLayer sees its input only through autocast's cast to
    `dtype`: autocast to dtype is on, and the MLP is transformers' LlamaMLP whose input
    goes only to two torch.nn.Linear (autocast casts a Linear's input), with no hooks that
    would see the input first. Then an input in dtype gives what its float32 form gives."""
    from transformers.models.llama import modeling_llama
    if not (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype):
        return False
    if type(mlp) is not modeling_llama.LlamaMLP:
        return False
    linears = (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None))
    return all(type(m) is nn.Linear for m in linears) and not _hooked(mlp, *linears)


def _llama_add_norm(self, attn_out, residual):
    """`residual + attn_out` and post_attention_layernorm of it, as LlamaDecoderLayer and
    LlamaRMSNorm compute them: s = residual + attn_out in their promoted dtype (added in
    float32), x_hat = s * rsqrt(mean(s^2) + eps) in float32, rounded to s's dtype, then
    weight * x_hat in the promoted dtype of the weight and s. Returns (the norm's output,
    s), fused where the add-RMSNorm op can express that:

    - the weight in s's dtype: the op with round_xhat (on input and residual cast to s's
      dtype where they differ from it: exact);
    - another weight dtype (a float32 weight of a bfloat16 model): the op without weight
      gives x_hat in s's dtype, and the weight multiplies it;
    - under autocast to attn_out's dtype, where the MLP casts its input to that dtype
      anyway (_mlp_casts_its_input), the output is computed in attn_out's dtype directly
      from a float32 residual or weight, as the op supports them: bfloat16 attention output
      with a float32 residual (the sum in float32, x_hat not rounded), or with a float32
      weight (x_hat rounded, the product rounded as the MLP's cast rounds it).

    A float64 sum (normalized in float32 by LlamaRMSNorm, in float64 by the op) and
    other dtypes run the unfused code."""
    norm = self.post_attention_layernorm
    weight, eps = norm.weight, norm.variance_epsilon
    n = weight.shape
    sum_dtype = torch.promote_types(attn_out.dtype, residual.dtype)
    if sum_dtype not in (torch.float32, *_REDUCED) or not weight.is_floating_point():
        residual = residual + attn_out
        return norm(residual), residual
    if (attn_out.dtype in _REDUCED and residual.dtype in (attn_out.dtype, torch.float32)
            and weight.dtype in (attn_out.dtype, torch.float32) and _mlp_casts_its_input(self.mlp, attn_out.device.type, attn_out.dtype)):
        return _add_rms_norm("add_rms_norm", attn_out, residual, n, weight, eps, False, True,
                             round_xhat=sum_dtype != torch.float32)[:2]
    x, res = attn_out.to(sum_dtype), residual.to(sum_dtype)
    if weight.dtype == sum_dtype:
        return _add_rms_norm("add_rms_norm", x, res, n, weight, eps, False, True, round_xhat=True)[:2]
    x_hat, s = _add_rms_norm("add_rms_norm", x, res, n, None, eps, False, True)[:2]
    return weight * x_hat, s


def _llama_decoder_forward(self, hidden_states, **kwargs):
    """LlamaDecoderLayer.forward (transformers' modeling_llama) with the residual add after
    the attention fused into post_attention_layernorm: add_rms_norm gives the MLP's input
    and the new residual in one pass (see _llama_add_norm for the dtypes)."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states, residual = _llama_add_norm(self, hidden_states, residual)
    return residual + self.mlp(hidden_states)


def _bert_layer_ok(module):
    return type(getattr(module, "LayerNorm", None)) in (nn.LayerNorm, FusedLayerNorm)


def _llama_layer_ok(module):
    from transformers.models.llama import modeling_llama
    return type(getattr(module, "post_attention_layernorm", None)) is modeling_llama.LlamaRMSNorm


def _known_add_norm_classes():
    """{layer class: (its fused subclass, the check that an instance has the norm the
    fused forward expects)} for the model code this module knows (and can import):
    transformers' BertSelfOutput and BertOutput (post-norm LayerNorm) and
    LlamaDecoderLayer (pre-norm RMSNorm)."""
    try:
        from transformers.models.bert import modeling_bert
        from transformers.models.llama import modeling_llama
    except ImportError:
        return {}
    known = {}
    for cls, forward, ok in ((modeling_bert.BertSelfOutput, _bert_add_norm_forward, _bert_layer_ok),
                             (modeling_bert.BertOutput, _bert_add_norm_forward, _bert_layer_ok),
                             (modeling_llama.LlamaDecoderLayer, _llama_decoder_forward, _llama_layer_ok)):
        if cls not in _FUSED_ADD_NORM:
            name = _ADD_NORM_PREFIX + cls.__name__
            fused = type(name, (cls,), {
                "forward": forward, "__module__": __name__, "__qualname__": f"_hf_classes.{name}",
                "__doc__": f"{cls.__name__} whose residual add runs fused into its norm (fuse_add_norm)."})
            # reachable by its qualified name, so that converted models pickle (copy.deepcopy,
            # pickle, torch.save of the whole model); the layer classes' names are distinct
            setattr(_hf_classes, name, fused)
            _FUSED_ADD_NORM[cls] = fused
        known[cls] = (_FUSED_ADD_NORM[cls], ok)
    return known


_FUSED_ADD_NORM = {}  # the classes made so far: one per layer class, so instances share it
_ADD_NORM_PREFIX = "FusedAddNorm"


def fuse_add_norm(model: nn.Module) -> nn.Module:
    r"""Makes the residual add-and-norm layers of Hugging Face BERT and Llama models
    run fused, in place, and returns ``model``: ``transformers``' ``BertSelfOutput`` and
    ``BertOutput`` (anywhere in ``model``) compute ``LayerNorm(hidden_states +
    input_tensor)`` with :func:`fused_norm.add_layer_norm_post`, and ``LlamaDecoderLayer``
    forms the residual after its attention and normalizes it
    (``post_attention_layernorm``) with :func:`fused_norm.add_rms_norm`, also where the
    dtypes differ (a float32 residual stream or float32 norm weights with bfloat16/float16
    activations, under autocast or not), computing what ``LlamaRMSNorm`` computes; a
    float64 model's layers, which ``LlamaRMSNorm`` normalizes in float32, run unfused.

    As :func:`convert_model` does for norm layers, it changes the class of each such
    layer to a subclass whose only difference is ``forward`` (the same dense, dropout and
    LayerNorm, then the fused add and norm); parameters, ``state_dict`` keys and every
    reference to the layer stay as they were. Left alone: every other class (subclasses of
    those included), layers whose norm is not the one the model code builds (BERT: a plain
    :class:`torch.nn.LayerNorm` or :class:`FusedLayerNorm`; Llama: ``LlamaRMSNorm``), and
    layers whose ``forward`` was replaced on the instance. Call :func:`convert_model` too for the model's other
    LayerNorms (the embeddings')."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_add_norm expects a torch.nn.Module, got {type(model).__name__}")
    known = _known_add_norm_classes()
    for module in model.modules():
        fused, ok = known.get(type(module), (None, None))
        if fused is not None and "forward" not in vars(module) and ok(module):
            module.__class__ = fused
    return model
