"""The implementations compared: fused_norm and its peers.

Each one turns a case's inputs into a forward function ``fn(x) -> y`` plus the parameters
that get gradients; bench.py wraps that for the direction measured. ``unavailable_op(op,
device_type)`` says why an implementation cannot run an op (not installed, CUDA only, no BatchNorm,
no residual add + norm)."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_norm


@dataclass
class Inputs:
    """The tensors of one case. weight/bias are shared; each BatchNorm implementation gets its own
    copy of the running statistics (they are updated in place)."""
    x: torch.Tensor
    dy: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    eps: float = 1e-5
    momentum: float = 0.1
    residual: torch.Tensor | None = None  # residual add + LayerNorm: added to x before the norm
    pre_norm: bool = False  # ... and the sum returned as a second output
    rms: bool = False  # ... RMSNorm instead of LayerNorm (weight only)

    @property
    def normalized_shape(self):
        return tuple(self.weight.shape)

    def running_stats(self):
        return self.running_mean.clone(), self.running_var.clone()


def _module_with(module, inputs: Inputs, names=("weight", "bias")):
    """Move a peer's module to the inputs' device, its parameters `names` set to (copies of) ours."""
    module = module.to(device=inputs.x.device)
    with torch.no_grad():
        for name in names:
            ours = getattr(inputs, name)
            setattr(module, name, torch.nn.Parameter(ours.detach().clone(), requires_grad=ours.requires_grad))
    return module


def _import_failure(spec: str) -> str | None:
    """Why "module" or "module:attribute" does not import (None: it does)."""
    module, _, attr = spec.partition(":")
    try:
        imported = importlib.import_module(module)
        if attr:
            getattr(imported, attr)
    except Exception as e:  # noqa: BLE001 -- any import failure means "missing"
        return f"{type(e).__name__}: {e}"
    return None


def _norm_name(norm: str) -> str:
    return dict(ln="LayerNorm", rms="RMSNorm", bn="BatchNorm")[norm]


class Impl:
    name = ""
    label = ""
    package = None  # distribution name, for the version in the environment record
    modules = {}  # norm -> module that must import
    add_modules = {}  # residual add + norm ("ln" or "rms") -> "module" or "module:attribute" that must import
    cuda_only = False
    note = ""  # printed under the results when this implementation is measured

    def _unavailable_in(self, modules: dict, key: str, what: str, device_type: str) -> str | None:
        if key not in modules:
            return f"{self.label} has no {what}"
        if self.cuda_only and device_type != "cuda":
            return f"{self.label} is CUDA only"
        failure = _import_failure(modules[key])
        return f"{self.label} not importable ({failure})" if failure else None

    def unavailable(self, norm: str, device_type: str) -> str | None:
        return self._unavailable_in(self.modules, norm, _norm_name(norm), device_type)

    def unavailable_op(self, op, device_type: str) -> str | None:
        """Why this implementation cannot run op (a cases.Op), or None: unavailable(op.norm) for a plain
        norm; for a residual add + norm, whether add_modules has (an importable module for) it."""
        if not op.residual:
            return self.unavailable(op.norm, device_type)
        kind = "rms" if op.rms else "ln"
        return self._unavailable_in(self.add_modules, kind, "residual add + " + _norm_name(kind), device_type)

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package) if self.package else None
        except importlib.metadata.PackageNotFoundError:
            return None

    def forward(self, norm: str, inputs: Inputs, training: bool):
        """(fn, params): fn(x) -> y (or a tuple of outputs), and the parameter tensors that receive
        gradients (the residual among them)."""
        if norm == "ln" and inputs.residual is not None:
            return self.add_layer_norm(inputs)
        if norm == "ln":
            return self.layer_norm(inputs)
        if norm == "rms":
            return self.rms_norm(inputs)
        return self.batch_norm(inputs, training)

    def layer_norm(self, inputs: Inputs):
        raise NotImplementedError

    def rms_norm(self, inputs: Inputs):
        """RMSNorm of inputs.x with inputs.weight (inputs.bias unused)."""
        raise NotImplementedError

    def add_layer_norm(self, inputs: Inputs):
        raise NotImplementedError(f"{self.label} has no residual add + LayerNorm")

    def batch_norm(self, inputs: Inputs, training: bool):
        raise NotImplementedError


class FusedNorm(Impl):
    name = label = package = "fused_norm"

    def unavailable_op(self, op, device_type):
        return self.unavailable(op.norm, device_type)

    def unavailable(self, norm, device_type):
        if norm == "bn" and not hasattr(fused_norm, "batch_norm"):
            return "fused_norm.batch_norm is not in this build yet"
        if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                "fused_norm::layer_norm_fwd", "CUDA"):
            return "fused_norm was built without CUDA kernels"
        return None

    def layer_norm(self, t):
        return (lambda x: fused_norm.layer_norm(x, t.normalized_shape, t.weight, t.bias, t.eps)), [t.weight, t.bias]

    def rms_norm(self, t):
        return (lambda x: fused_norm.rms_norm(x, t.normalized_shape, t.weight, t.eps)), [t.weight]

    def batch_norm(self, t, training):
        rm, rv = t.running_stats()
        return (lambda x: fused_norm.batch_norm(x, rm, rv, t.weight, t.bias, training, t.momentum, t.eps)), \
            [t.weight, t.bias]

    def add_layer_norm(self, t):
        if t.rms:
            fn = fused_norm.add_rms_norm if t.pre_norm else fused_norm.add_rms_norm_post
            return (lambda x: fn(x, t.residual, t.normalized_shape, t.weight, t.eps)), [t.residual, t.weight]
        fn = fused_norm.add_layer_norm if t.pre_norm else fused_norm.add_layer_norm_post
        return (lambda x: fn(x, t.residual, t.normalized_shape, t.weight, t.bias, t.eps)), \
            [t.residual, t.weight, t.bias]


def _ln_ref(x, weight, bias, normalized_shape, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _rms_ref(x, weight, normalized_shape, eps):
    return F.rms_norm(x, normalized_shape, weight, eps)


def _add_ln_ref(x, residual, weight, bias, normalized_shape, eps, pre_norm, rms=False):
    s = x + residual
    y = F.rms_norm(s, normalized_shape, weight, eps) if rms else F.layer_norm(s, normalized_shape, weight, bias, eps)
    return (y, s) if pre_norm else y


def _bn_ref(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


class TorchEager(Impl):
    name, label, package = "torch", "torch eager", "torch"
    modules = {"ln": "torch", "rms": "torch", "bn": "torch"}
    add_modules = {"ln": "torch", "rms": "torch"}
    note = ("torch eager: torch.nn.functional.layer_norm / rms_norm / batch_norm (native kernels, cuDNN where torch "
            "picks it).")

    def layer_norm(self, t):
        return (lambda x: _ln_ref(x, t.weight, t.bias, t.normalized_shape, t.eps)), [t.weight, t.bias]

    def rms_norm(self, t):
        return (lambda x: _rms_ref(x, t.weight, t.normalized_shape, t.eps)), [t.weight]

    def batch_norm(self, t, training):
        rm, rv = t.running_stats()
        return (lambda x: _bn_ref(x, rm, rv, t.weight, t.bias, training, t.momentum, t.eps)), [t.weight, t.bias]

    def add_layer_norm(self, t):
        return (lambda x: _add_ln_ref(x, t.residual, t.weight, t.bias, t.normalized_shape, t.eps, t.pre_norm,
                                      t.rms)), [t.residual, t.weight] + ([] if t.rms else [t.bias])


class TorchCompile(Impl):
    """torch.compile (Inductor, static shapes) of the torch reference functions. Dynamo is reset
    whenever the input changes, so each input shape/dtype/layout gets its own graphs (one per
    direction and mode) and no guard list grows over the run."""
    name, label, package = "compile", "torch.compile", "torch"
    modules = {"ln": "torch._inductor", "rms": "torch._inductor", "bn": "torch._inductor"}
    add_modules = {"ln": "torch._inductor", "rms": "torch._inductor"}
    note = ("torch.compile: Inductor-compiled torch.nn.functional reference (dynamic=False), compile time "
            "excluded (first calls are warm-up).")

    def __init__(self):
        self._key = None
        self._ln = self._rms = self._bn = self._add_ln = None
        # One shape's add + norm variants (pre/post, LayerNorm/RMSNorm, with and without
        # grad) are as many graphs of _add_ln_ref: past dynamo's default limit of 8 it would
        # fall back to eager code and time that instead.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def _compiled(self, x):
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        if key != self._key:
            torch._dynamo.reset()
            self._ln = torch.compile(_ln_ref, dynamic=False)
            self._rms = torch.compile(_rms_ref, dynamic=False)
            self._bn = torch.compile(_bn_ref, dynamic=False)
            self._add_ln = torch.compile(_add_ln_ref, dynamic=False)
            self._key = key
        return self._ln, self._rms, self._bn, self._add_ln

    def layer_norm(self, t):
        ln = self._compiled(t.x)[0]
        return (lambda x: ln(x, t.weight, t.bias, t.normalized_shape, t.eps)), [t.weight, t.bias]

    def rms_norm(self, t):
        rms = self._compiled(t.x)[1]
        return (lambda x: rms(x, t.weight, t.normalized_shape, t.eps)), [t.weight]

    def batch_norm(self, t, training):
        bn = self._compiled(t.x)[2]
        rm, rv = t.running_stats()
        return (lambda x: bn(x, rm, rv, t.weight, t.bias, training, t.momentum, t.eps)), [t.weight, t.bias]

    def add_layer_norm(self, t):
        fn = self._compiled(t.x)[3]
        return (lambda x: fn(x, t.residual, t.weight, t.bias, t.normalized_shape, t.eps, t.pre_norm, t.rms)), \
            [t.residual, t.weight] + ([] if t.rms else [t.bias])


class Apex(Impl):
    name, label, package = "apex", "apex", "apex"
    modules = {"ln": "apex.normalization", "rms": "apex.normalization", "bn": "apex.parallel"}
    cuda_only = True
    note = ("apex: apex.normalization.FusedLayerNorm; apex.parallel.SyncBatchNorm in one process "
            "(channel_last=True on a permuted view for channels_last and (N, C) inputs).")

    def layer_norm(self, t):
        from apex.normalization import FusedLayerNorm
        m = _module_with(FusedLayerNorm(t.normalized_shape, eps=t.eps), t)
        return m, [m.weight, m.bias]

    def rms_norm(self, t):
        from apex.normalization import FusedRMSNorm
        m = _module_with(FusedRMSNorm(t.normalized_shape, eps=t.eps), t, ("weight",))
        return m, [m.weight]

    def batch_norm(self, t, training):
        from apex.parallel import SyncBatchNorm
        x = t.x
        channels_last = x.dim() == 2 or (x.dim() > 2 and not x.is_contiguous())
        m = _module_with(SyncBatchNorm(x.shape[1], eps=t.eps, momentum=t.momentum, channel_last=channels_last), t)
        m.running_mean, m.running_var = t.running_stats()
        m.train(training)
        if channels_last and x.dim() > 2:  # apex wants channels as the last dim: a permuted view, no copy
            to_last = (0, *range(2, x.dim()), 1)
            back = (0, x.dim() - 1, *range(1, x.dim() - 1))
            return (lambda x: m(x.permute(to_last)).permute(back)), [m.weight, m.bias]
        return m, [m.weight, m.bias]


class Liger(Impl):
    name, label, package = "liger", "Liger-Kernel", "liger-kernel"
    modules = {"ln": "liger_kernel.transformers", "rms": "liger_kernel.transformers"}
    add_modules = {"rms": "liger_kernel.transformers:LigerFusedAddRMSNorm"}
    cuda_only = True
    note = ("Liger-Kernel: liger_kernel.transformers.LigerLayerNorm / LigerRMSNorm (Triton); residual add + RMSNorm: "
            "LigerFusedAddRMSNorm (casting_mode 'llama', in_place=False), which writes the sum for post-norm too "
            "(its backward reads it).")

    def layer_norm(self, t):
        from liger_kernel.transformers import LigerLayerNorm
        m = _module_with(LigerLayerNorm(t.normalized_shape[-1], eps=t.eps, bias=True), t)
        return m, [m.weight, m.bias]

    def rms_norm(self, t):
        from liger_kernel.transformers import LigerRMSNorm
        m = _module_with(LigerRMSNorm(t.normalized_shape[-1], eps=t.eps), t, ("weight",))
        return m, [m.weight]

    def add_layer_norm(self, t):
        if not t.rms:
            return super().add_layer_norm(t)
        from liger_kernel.transformers import LigerFusedAddRMSNorm
        # in_place=False: the default of Liger's functional form (True) writes dx into dy, which the
        # benchmark reuses
        m = _module_with(LigerFusedAddRMSNorm(t.normalized_shape[-1], eps=t.eps, in_place=False), t, ("weight",))

        def fn(x):
            y, s = m(x, t.residual)  # (output, new residual)
            return (y, s) if t.pre_norm else y
        return fn, [t.residual, m.weight]


class Quack(Impl):
    name, label, package = "quack", "QuACK", "quack-kernels"
    modules = {"ln": "quack.layernorm", "rms": "quack.rmsnorm"}
    cuda_only = True
    note = ("QuACK: quack.layernorm.layernorm (CuTe DSL); it has a float32 weight and no bias, so it "
            "moves 2N fewer parameter bytes (bytes are counted the same for all).")

    def layer_norm(self, t):
        from quack.layernorm import layernorm
        w = t.weight.detach().float().requires_grad_(t.weight.requires_grad)
        return (lambda x: layernorm(x, w, t.eps)), [w]

    def rms_norm(self, t):
        from quack.rmsnorm import rmsnorm
        w = t.weight.detach().clone().requires_grad_(t.weight.requires_grad)
        return (lambda x: rmsnorm(x, w, eps=t.eps)), [w]


class FlashAttn(Impl):
    """flash-attention's Triton residual add + LayerNorm / RMSNorm, on the add-norm cases only."""
    name, label, package = "flash_attn", "flash-attn", "flash-attn"
    add_modules = {"ln": "flash_attn.ops.triton.layer_norm:layer_norm_fn",
                   "rms": "flash_attn.ops.triton.layer_norm:layer_norm_fn"}
    cuda_only = True
    note = ("flash-attn: flash_attn.ops.triton.layer_norm.layer_norm_fn (Triton) with residual, prenorm and "
            "is_rms_norm; it writes the sum for post-norm too (its backward reads it).")

    def unavailable(self, norm, device_type):
        return f"{self.label} is measured on the residual add + norm cases only"

    def add_layer_norm(self, t):
        from flash_attn.ops.triton.layer_norm import layer_norm_fn
        bias = None if t.rms else t.bias

        def fn(x):  # (output, new residual) for pre-norm, output for post-norm
            return layer_norm_fn(x, t.weight, bias, residual=t.residual, eps=t.eps, prenorm=t.pre_norm,
                                 residual_in_fp32=False, is_rms_norm=t.rms)
        return fn, [t.residual, t.weight] + ([] if t.rms else [t.bias])


PEERS = {impl.name: impl for impl in (TorchEager, TorchCompile, Apex, Liger, Quack, FlashAttn)}
OURS = FusedNorm
