"""Converted models under torch.autocast (the dtypes each norm runs in and returns, as
torch's) and through torch.export (eval and training, running statistics included)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import fused_norm
from conftest import CUDA_OK, torch_norm_class

# torch.export's own pytree code warns about its LeafSpec deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

_NO_CUDA = pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")
AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"), pytest.param("cpu", torch.float16, id="cpu-fp16"),
            pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_NO_CUDA),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_NO_CUDA)]


class LNNet(nn.Module):
    """A norm on the float32 input, then Linear -> LayerNorm -> Linear (the norm gets the
    autocast dtype), with a residual add that promotes back to float32."""

    def __init__(self):
        super().__init__()
        self.ln0 = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.out = nn.Linear(32, 16)
        self.ln2 = nn.LayerNorm(16, bias=False)

    def forward(self, x):
        h = self.ln0(x)
        return self.ln2(self.out(self.ln(self.fc(h))) + x)


class BNNet(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, then Linear -> BatchNorm1d."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8, momentum=momentum)
        self.fc = nn.Linear(8, 6, bias=False)  # a bias before a BatchNorm gets no gradient
        self.bn1 = nn.BatchNorm1d(6, momentum=momentum)

    def forward(self, x):
        return self.bn1(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def _make(name, device="cpu", momentum=0.1):
    torch.manual_seed(0)
    model = LNNet() if name == "ln" else BNNet(momentum)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                for t in (m.weight, m.bias, getattr(m, "running_mean", None)):
                    if t is not None:
                        t.add_(torch.randn(t.shape) * 0.3)
    return model.to(device)


def _input(name, seed, device="cpu", batch=4):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 5, 16) if name == "ln" else (batch, 3, 6, 6)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(device)


@contextlib.contextmanager
def _record_norms(model):
    """For each norm call: its name, input dtype, output, and what torch's own module
    returns for the same input (run on a copy, so running statistics are left alone)."""
    seen = []

    def hook(mod, args, out, name):
        with torch.no_grad():
            ref = torch_norm_class(mod).forward(copy.deepcopy(mod), *args)
        seen.append((name, args[0].dtype, out, ref))

    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, out, name))
             for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
@pytest.mark.parametrize("name", ["ln", "bn"])
def test_autocast_model(name, device, amp_dtype):
    """Forward under autocast and backward, in training and eval: every norm gets and
    returns the dtypes torch's norm does and the values agree (each norm's own output
    within one rounding of the autocast dtype; outputs and gradients within its precision)."""
    model = _make(name, device)
    converted = fused_norm.convert_model(copy.deepcopy(model))
    for training in (True, False):
        x = _input(name, int(training), device)
        runs = []
        for m in (model, converted):
            m.train(training)
            m.zero_grad()
            with torch.autocast(device, dtype=amp_dtype), _record_norms(m) as norms:
                y = m(x)
            y.float().square().sum().backward()
            runs.append((y, norms, {k: p.grad for k, p in m.named_parameters()}))
        (ya, na, ga), (yb, nb, gb) = runs
        assert [(n, dt, o.dtype, o.shape) for n, dt, o, _ in nb] == [(n, dt, o.dtype, o.shape) for n, dt, o, _ in na]
        assert amp_dtype in {o.dtype for _, _, o, _ in na}  # some norm runs in the low precision
        assert all(torch.equal(o, r) for _, _, o, r in na)  # the reference is torch's own computation
        # Each of our norms against torch's on the very input ours got: upstream layers
        # amplify a one-rounding difference, so comparing across the two models would not do.
        for name_, _, b, a in nb:
            ulps = 4 if a.dtype == torch.float32 else 1
            atol = ulps * torch.finfo(a.dtype).eps * a.detach().abs().max().float().clamp_min(1).item()
            torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=atol, msg=lambda msg: f"{name_}: {msg}")
        assert yb.dtype == ya.dtype
        scale = ya.detach().abs().max().float()
        torch.testing.assert_close(yb.float() / scale, ya.float() / scale, rtol=2e-2, atol=2e-2)
        for k in ga:
            assert gb[k].dtype == ga[k].dtype, k
            scale = ga[k].abs().max().clamp_min(1e-3)
            torch.testing.assert_close(gb[k] / scale, ga[k] / scale, rtol=2e-2, atol=2e-2, msg=lambda msg: f"{k}: {msg}")
        for (k, a), b in zip(model.named_buffers(), converted.buffers()):
            assert b.dtype == a.dtype, k
            a, b = a.double(), b.double()
            scale = a.abs().max().clamp_min(1e-3)
            torch.testing.assert_close(b / scale, a / scale, rtol=2e-2, atol=2e-2, msg=lambda msg: f"{k}: {msg}")


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
def test_autocast_ops_like_torch(device, amp_dtype):
    """The functional forms under autocast: output dtype as torch's for every input and
    parameter dtype (float64 is never cast), values close."""
    dts = [torch.float32, amp_dtype, torch.float64]
    for xdt in dts:
        for wdt in dts + [None]:
            x = torch.randn(4, 6, 5, device=device, dtype=xdt)
            w = None if wdt is None else torch.rand(5, device=device, dtype=wdt) + 0.5
            c = None if wdt is None else torch.rand(6, device=device, dtype=wdt) + 0.5
            for ours, theirs in (
                (lambda: fused_norm.layer_norm(x, (5,), w, w), lambda: F.layer_norm(x, (5,), w, w)),
                (lambda: fused_norm.batch_norm(x, None, None, c, c, True),
                 lambda: F.batch_norm(x, None, None, c, c, True)),
            ):
                with torch.autocast(device, dtype=amp_dtype):
                    try:
                        expected = theirs()
                    except RuntimeError:  # a dtype mix torch rejects: so do we
                        with pytest.raises(RuntimeError):
                            ours()
                        continue
                    got = ours()
                assert got.dtype == expected.dtype, (xdt, wdt)
                torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------


def _called_ops(graph):
    """The ops a graph calls, batch_norm_fwd included (it mutates the running statistics,
    so the graph calls it through auto_functionalized)."""
    return {n.args[0] if "auto_functionalized" in str(n.target) else n.target for n in graph.nodes}


def _exported_buffers_to_mutate(model, x):
    ep = torch.export.export(model, (x,))
    return set(ep.run_decompositions().graph_signature.buffers_to_mutate.values())


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,momentum", [("ln", 0.1), ("bn", 0.1), ("bn", None)], ids=["ln", "bn", "bn-momentum-None"])
def test_export(name, momentum, training, strict):
    """torch.export of a model with fused modules, with a dynamic batch size: the graph
    calls our ops, and the exported program's module (and its decomposed form) gives
    eager's outputs over 3 calls, with the same running statistics, in eval and training."""
    model = _make(name, momentum=momentum)
    model.train(training)
    converted = fused_norm.convert_model(copy.deepcopy(model))
    ep = torch.export.export(converted, (_input(name, 0),), dynamic_shapes=({0: Dim("batch", min=2)},),
                             strict=strict)
    op = "layer_norm_fwd" if name == "ln" else "batch_norm_fwd"
    assert getattr(torch.ops.fused_norm, op).default in _called_ops(ep.graph)
    # In training the decomposed program lists the running statistics as mutated buffers
    # (an exported program fixes the mode), as torch's does for nn.BatchNorm. In eval it
    # lists them too, unlike torch's (batch_norm_fwd's schema marks them mutated in either
    # mode; eval writes them back unchanged).
    mutated = _exported_buffers_to_mutate(copy.deepcopy(converted), _input(name, 0))
    stats = {f"{bn}.{b}" for bn in ("bn", "bn1") for b in ("running_mean", "running_var")}
    counters = {f"{bn}.num_batches_tracked" for bn in ("bn", "bn1")}
    assert mutated == ((stats | counters if training else stats) if name == "bn" else set())
    if momentum is not None and (training or name == "ln"):
        assert mutated == _exported_buffers_to_mutate(copy.deepcopy(model), _input(name, 0))
    decomposed = ep.run_decompositions()
    assert getattr(torch.ops.fused_norm, op).default in _called_ops(decomposed.graph)
    for program in (ep, decomposed):
        eager = copy.deepcopy(converted)
        exported = program.module()
        for step, batch in enumerate((4, 7, 3)):
            x = _input(name, step + 1, batch=batch)
            torch.testing.assert_close(exported(x), eager(x))
        buffers = dict(exported.named_buffers())
        assert buffers.keys() == dict(eager.named_buffers()).keys()
        for k, a in eager.named_buffers():
            torch.testing.assert_close(buffers[k], a, msg=lambda msg: f"{k}: {msg}")
        if training and name == "bn":
            assert buffers["bn.num_batches_tracked"].item() > 0


def test_exported_module_shares_state_with_the_model_like_torch():
    """As with torch's nn.BatchNorm, the module of an exported training-mode program holds
    the very buffers of the model it was exported from, so running it updates them."""
    counts = []
    for convert in (False, True):
        model = _make("bn")
        if convert:
            fused_norm.convert_model(model)
        exported = torch.export.export(model, (_input("bn", 0),)).module()
        before = model.bn.running_mean.clone()
        exported(_input("bn", 1))
        counts.append((model.bn.num_batches_tracked.item(), torch.equal(model.bn.running_mean, before)))
    assert counts[0] == counts[1] == (1, False)


def test_export_training_with_momentum_none():
    """A training-mode BatchNorm with momentum=None (cumulative average) exports: the
    kernel reads 1/num_batches_tracked from the tensor. torch 2.13's own nn.BatchNorm
    does not (its forward calls float() on num_batches_tracked, a data-dependent value)."""
    model = _make("bn", momentum=None).train()
    converted = fused_norm.convert_model(copy.deepcopy(model))
    exported = torch.export.export(copy.deepcopy(converted), (_input("bn", 0),)).module()
    for step in range(3):
        x = _input("bn", step + 1)
        torch.testing.assert_close(exported(x), model(x))
    buffers = dict(exported.named_buffers())
    for k, a in model.named_buffers():
        torch.testing.assert_close(buffers[k], a, msg=lambda msg: f"{k}: {msg}")
    if torch.__version__.startswith("2.13."):
        with pytest.raises(Exception, match="data-dependent"):
            torch.export.export(copy.deepcopy(model), (_input("bn", 0),))
