"""benchmarks/bench.py and impls.py without timing anything: which implementation each case
calls, which peers a case skips and why, and the call adapters of the CUDA-only peers
(checked against fake modules, as the packages are not installed here)."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench  # noqa: E402
import cases  # noqa: E402
import impls  # noqa: E402

CPU = torch.device("cpu")


class _record_ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_norm":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


def _case(op, shape=None, dtype="fp32"):
    shape = shape or cases.Shape("ln", (6, 64))
    return cases.Case(cases.QUICK_SWEEPS[0], shape, cases.OPS[op], dtype)


@pytest.mark.parametrize("op, expected", [
    ("ln_fwd", ["layer_norm_fwd"]), ("rms_fwd", ["rms_norm_fwd"]), ("rms_fwdbwd", ["rms_norm_fwd", "rms_norm_bwd"]),
    ("addln_post_fwd", ["add_layer_norm_fwd"]), ("addrms_pre_fwdbwd", ["add_rms_norm_fwd", "add_rms_norm_bwd"]),
])
def test_cases_on_layer_norm_shapes_call_their_op(op, expected):
    """The RMSNorm and add-norm ops run over the LayerNorm sweeps' shapes: each calls its
    own kernel (an RMSNorm case is not a LayerNorm one)."""
    case = _case(op)
    call = bench.build_call(impls.OURS(), case, bench.make_inputs(case, CPU))
    with _record_ops() as record:
        call()
    assert record.ops == expected


ADD_OPS = [op for op in cases.OPS.values() if op.residual]


def _modules_missing(monkeypatch, *names):
    """Makes these packages not importable, whether installed or not."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_add_norm_peers_declared_and_skipped(monkeypatch, device_type):
    """Which peers run the residual add + norm cases: torch eager and torch.compile always,
    flash-attn (LayerNorm and RMSNorm) and Liger-Kernel (RMSNorm) on CUDA where importable,
    apex and QuACK never; each skip says why."""
    _modules_missing(monkeypatch, "flash_attn", "liger_kernel")
    assert set(impls.PEERS) >= {"torch", "compile", "apex", "liger", "quack", "flash_attn"}
    for op in ADD_OPS:
        norm = "RMSNorm" if op.rms else "LayerNorm"
        why = {name: impl().unavailable_op(op, device_type) for name, impl in impls.PEERS.items()}
        assert why["torch"] is None and why["compile"] is None, op.name
        assert why["apex"] == f"apex has no residual add + {norm}"
        assert why["quack"] == f"QuACK has no residual add + {norm}"
        if device_type == "cpu":
            assert why["flash_attn"] == "flash-attn is CUDA only"
        else:
            assert why["flash_attn"].startswith("flash-attn not importable (")
        if not op.rms:
            assert why["liger"] == "Liger-Kernel has no residual add + LayerNorm"
        elif device_type == "cpu":
            assert why["liger"] == "Liger-Kernel is CUDA only"
        else:
            assert why["liger"].startswith("Liger-Kernel not importable (")
        assert impls.OURS().unavailable_op(op, "cpu") is None
    for norm in ("ln", "rms", "bn"):  # flash-attn is not a peer of the plain norms
        op = next(o for o in cases.OPS.values() if o.norm == norm and not o.residual)
        assert "residual add + norm cases only" in impls.FlashAttn().unavailable_op(op, "cuda")


def test_runner_skips_and_notes(monkeypatch):
    """bench.py's Runner on CPU: the CUDA-only peers skip every add-norm case with their
    reason, the notes say so, and a plain LayerNorm case is not an add-norm one."""
    _modules_missing(monkeypatch, "flash_attn", "liger_kernel")
    args = bench.parse_args(["--device", "cpu", "--peers", "torch,liger,flash_attn", "--quick"])
    runner = bench.Runner(args, {"peak_bandwidth_GBps": None})
    case = _case("addrms_pre_fwd")
    assert runner.skip_reason(runner.impls[0], case) is None
    reasons = {impl.name: runner.skip_reason(impl, case) for impl in runner.impls[1:]}
    assert reasons == {"torch": None, "liger": "Liger-Kernel is CUDA only", "flash_attn": "flash-attn is CUDA only"}
    assert runner.skip_reason(runner.impls[-1], _case("ln_fwd")) == \
        "flash-attn is measured on the residual add + norm cases only"
    notes = runner.notes(ADD_OPS)
    assert "flash-attn: not measured (flash-attn is CUDA only)." in notes
    assert "Liger-Kernel: not measured (Liger-Kernel has no residual add + LayerNorm; Liger-Kernel is CUDA only)." \
        in notes


def test_list_still_works(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cases.OPS)


# ---------------------------------------------------------------------------------------
# The call adapters, against fake packages with the real entry points' signatures that
# record their arguments and compute the reference (torch's composition).


def _reference(x, residual, weight, bias, eps, rms):
    s = x + residual
    y = (torch.nn.functional.rms_norm(s, s.shape[-1:], weight, eps) if rms
         else torch.nn.functional.layer_norm(s, s.shape[-1:], weight, bias, eps))
    return y, s


def _install(monkeypatch, dotted, **attrs):
    """A fake module `dotted` (and its parents) in sys.modules with these attributes."""
    import types
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        module = types.ModuleType(name)
        if i == len(parts):
            module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_flash_attn(monkeypatch):
    calls = []

    def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                      rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False,
                      is_rms_norm=False, return_dropout_mask=False, out_dtype=None, out=None, residual_out=None):
        calls.append(dict(weight=weight, bias=bias, residual=residual, eps=eps, prenorm=prenorm,
                          residual_in_fp32=residual_in_fp32, is_rms_norm=is_rms_norm, dropout_p=dropout_p))
        y, s = _reference(x, residual, weight, bias, eps, is_rms_norm)
        return (y, s) if prenorm else y

    _install(monkeypatch, "flash_attn.ops.triton.layer_norm", layer_norm_fn=layer_norm_fn)
    return calls


@pytest.fixture
def fake_liger(monkeypatch):
    calls = []

    class LigerFusedAddRMSNorm(torch.nn.Module):
        def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", init_fn="ones", in_place=False,
                     row_mode=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.variance_epsilon, self.offset, self.in_place = eps, offset, in_place

        def forward(self, hidden_states, residual):
            calls.append(dict(weight=self.weight, residual=residual, eps=self.variance_epsilon, offset=self.offset,
                              in_place=self.in_place))
            return _reference(hidden_states, residual, self.weight, None, self.variance_epsilon, True)

    _install(monkeypatch, "liger_kernel.transformers", LigerFusedAddRMSNorm=LigerFusedAddRMSNorm)
    return calls


@pytest.mark.parametrize("op", [op.name for op in ADD_OPS])
@pytest.mark.parametrize("peer", ["flash_attn", "liger"])
def test_peer_adapters(peer, op, fake_flash_attn, fake_liger):
    """Each CUDA-only add-norm peer, importable (fake), gets the case's tensors and options
    (residual, eps, pre/post-norm, RMSNorm or LayerNorm, no float32 residual, Liger without
    in-place gradients), returns (output, new residual) for pre-norm and the output for
    post-norm, and takes gradients w.r.t. input, residual and parameters like fused_norm's
    call of the same case."""
    impl, case = impls.PEERS[peer](), _case(op)
    if impl.unavailable_op(case.op, "cuda"):
        assert peer == "liger" and not case.op.rms
        return
    calls = fake_flash_attn if peer == "flash_attn" else fake_liger
    inputs = bench.make_inputs(case, CPU)
    fn, params = impl.forward(case.op.norm, inputs, case.op.training)
    out = fn(inputs.x)
    ours = impls.OURS().forward(case.op.norm, inputs, case.op.training)[0](inputs.x)
    assert len(calls) == 1
    call = calls[0]
    assert call["residual"] is inputs.residual and call["eps"] == inputs.eps
    assert torch.equal(call["weight"], inputs.weight)
    if peer == "flash_attn":
        assert call["weight"] is inputs.weight
        assert call["prenorm"] == inputs.pre_norm and call["is_rms_norm"] == inputs.rms
        assert call["residual_in_fp32"] is False and call["dropout_p"] == 0.0
        assert call["bias"] is (None if inputs.rms else inputs.bias)
    else:
        assert call["in_place"] is False and call["offset"] == 0.0
    assert isinstance(out, tuple) == isinstance(ours, tuple) == inputs.pre_norm
    for a, b in zip(out if inputs.pre_norm else (out,), ours if inputs.pre_norm else (ours,)):
        torch.testing.assert_close(a, b)
    if case.op.direction != "fwd":
        assert inputs.residual in params and len(params) == len(impls.OURS().forward(
            case.op.norm, inputs, None)[1])
        grads = bench.build_call(impl, case, inputs)()
        expected = bench.build_call(impls.OURS(), case, inputs)()
        assert len(grads) == len(expected) == 1 + len(params)
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b)
