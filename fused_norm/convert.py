"""convert_model: switch the LayerNorm / RMSNorm / BatchNorm layers of an existing model
to fused_norm's modules, in place, including the RMSNorm classes of Hugging Face's model
families (Llama and its copies, Gemma)."""

import copy
import warnings

import torch
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


class _hf_classes:
    """Namespace of the generated subclasses (see _hf_fused_class)."""


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
