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
