"""Compiled autograd (torch._dynamo.compiled_autograd): the backward of an eagerly run
forward, captured and compiled, calls fused_norm's backward ops and gives the gradients of
the plain eager backward, bit for bit, for every combination of wanted gradients."""

import pytest
import torch
from torch._dynamo import compiled_autograd
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop

from fused_norm import FusedBatchNorm2d, FusedLayerNorm

# (name, module factory, input shape, memory format)
CASES = [
    ("layer_norm", lambda: FusedLayerNorm(12), (3, 5, 12), None),
    ("layer_norm-2d-shape", lambda: FusedLayerNorm((4, 6)), (5, 4, 6), None),
    ("layer_norm-no-bias", lambda: FusedLayerNorm(12, bias=False), (7, 12), None),
    ("layer_norm-no-affine", lambda: FusedLayerNorm(12, elementwise_affine=False), (7, 12), None),
    ("batch_norm-train", lambda: FusedBatchNorm2d(5), (4, 5, 3, 3), None),
    ("batch_norm-train-channels-last", lambda: FusedBatchNorm2d(5), (4, 5, 3, 3), torch.channels_last),
    ("batch_norm-eval", lambda: FusedBatchNorm2d(5).eval(), (4, 5, 3, 3), None),
    ("batch_norm-no-affine", lambda: FusedBatchNorm2d(5, affine=False), (4, 5, 3, 3), None),
]
IDS = [c[0] for c in CASES]


class _Capture:
    """A compiled-autograd compiler: torch.compile(fullgraph=True) with an aot_eager-like
    backend that keeps the ATen-level graphs it runs."""

    def __init__(self):
        self.graphs = []  # compiled autograd's captures
        self.aten = []  # what AOTAutograd traced them to

    def _keep(self, gm, example_inputs):
        self.aten.append(gm)
        return boxed_nop(gm, example_inputs)

    def __call__(self, gm):
        self.graphs.append(gm)
        return torch.compile(gm, backend=aot_autograd(fw_compiler=self._keep), fullgraph=True)

    def aten_targets(self):
        return {str(n.target) for gm in self.aten for n in gm.graph.nodes if n.op == "call_function"}


def _setup(device, factory, shape, memory_format, dtype):
    """dtype: that of x and the parameters, or (x's, the parameters') for mixed precision."""
    x_dtype, p_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    torch.manual_seed(0)
    module = factory().to(device=device, dtype=p_dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    x = torch.randn(shape, device=device, dtype=x_dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    g = torch.randn(shape, device=device, dtype=x_dtype)
    return module, x, g


def _grads(module, x, g, want_x, want_params, compiler=None):
    x = x.detach().requires_grad_(want_x)
    for p in module.parameters():
        p.requires_grad_(want_params)
        p.grad = None
    y = module(x)  # eager forward: the graph holds fused_norm's own autograd nodes
    if compiler is None:
        y.backward(g)
    else:
        with compiled_autograd._enable(compiler):
            y.backward(g)
    return [t.grad for t in (x, *module.parameters())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32-params"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiled_backward_matches_eager(device, case, dtype):
    _, factory, shape, memory_format = case
    module, x, g = _setup(device, factory, shape, memory_format, dtype)
    has_params = len(list(module.parameters())) > 0
    for want_x, want_params in ((True, True), (True, False), (False, True)):
        if not has_params and not (want_x and not want_params):
            continue  # no parameters: the one combination is (x only)
        expected = _grads(module, x, g, want_x, want_params)
        compiled_autograd.reset()  # its cache is global: capture anew
        capture = _Capture()
        got = _grads(module, x, g, want_x, want_params, capture)
        assert capture.graphs, "compiled autograd captured nothing"
        bwd = "fused_norm.layer_norm_bwd" if "layer" in case[0] else "fused_norm.batch_norm_bwd"
        assert any(t.startswith(bwd) for t in capture.aten_targets()), capture.aten_targets()
        for e, o in zip(expected, got):
            assert (e is None) == (o is None)
            if e is not None:
                torch.testing.assert_close(o, e, rtol=0, atol=0)
                assert o.stride() == e.stride()


def test_recompiles_only_when_the_constants_change(device):
    """The node's constants (eps, normalized_shape's length) key the compiled graph: the same
    module is served from the cache, another eps is compiled anew and is right."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, device=device)
    g = torch.randn(4, 6, device=device)
    compiled_autograd.reset()
    capture = _Capture()
    for eps, n_graphs in ((1e-5, 1), (1e-5, 1), (0.5, 2)):
        module = FusedLayerNorm(6, eps=eps).to(device)
        expected = _grads(module, x, g, True, True)
        got = _grads(module, x, g, True, True, capture)
        assert len(capture.graphs) == n_graphs
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, rtol=0, atol=0)
