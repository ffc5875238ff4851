"""PyTorch's own test inputs, run through fused_norm: the ModuleInfos of nn.LayerNorm,
nn.RMSNorm, nn.BatchNorm1d/2d/3d (also as SyncBatchNorm) from torch.testing._internal.common_modules
and the OpInfos of nn.functional.layer_norm / batch_norm / rms_norm from common_methods_invocations,
with our classes and functions in place of torch's, on every device of the suite (the
`device` fixture). Every sample's forward, gradients, memory format and state are
compared with torch's; errors must match; float64 samples go through gradcheck,
gradgradcheck, forward AD and forward over reverse. Each test counts the calls of
torch.ops.fused_norm.* to prove that our kernels ran."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.testing._internal.opinfo.core import SampleInput

import fused_norm
from conftest import count_fused_calls

pytest.importorskip("expecttest")  # torch's test machinery needs it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

OURS = {
    nn.LayerNorm: fused_norm.FusedLayerNorm,
    nn.RMSNorm: fused_norm.FusedRMSNorm,
    nn.BatchNorm1d: fused_norm.FusedBatchNorm1d,
    nn.BatchNorm2d: fused_norm.FusedBatchNorm2d,
    nn.BatchNorm3d: fused_norm.FusedBatchNorm3d,
}
MODULE_INFOS = [m for m in module_db if m.module_cls in OURS]
# (module info, torch class, our class): SyncBatchNorm (no process group: the plain
# BatchNorm path) on the BatchNorm2d inputs.
MODULE_CASES = [(m, m.module_cls, OURS[m.module_cls]) for m in MODULE_INFOS] + [
    (m, nn.SyncBatchNorm, fused_norm.FusedSyncBatchNorm) for m in MODULE_INFOS if m.module_cls is nn.BatchNorm2d]
MODULE_IDS = [f"{theirs.__name__}" for _, theirs, _ in MODULE_CASES]
DTYPES = [torch.float32, torch.float64]


def _clone(t):
    """Tensors (in nested tuples/lists/dicts) cloned with their layout and requires_grad."""
    if isinstance(t, torch.Tensor):
        return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(t.requires_grad)
    if isinstance(t, (tuple, list)):
        return type(t)(_clone(v) for v in t)
    if isinstance(t, dict):
        return {k: _clone(v) for k, v in t.items()}
    return t


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _make_modules(theirs_cls, ours_cls, sample, dtype, device):
    c = sample.constructor_input
    theirs = theirs_cls(*c.args, **c.kwargs).to(device, dtype)
    ours = ours_cls(*c.args, **c.kwargs).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _module_samples(info, dtype, training, device):
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=training)


def _assert_state_equal(ours, theirs):
    for name, t in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], t, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info,theirs_cls,ours_cls", MODULE_CASES, ids=MODULE_IDS)
def test_module_forward_backward_state(device, info, theirs_cls, ours_cls, training, dtype):
    """Forward (values and strides), input and parameter gradients, running statistics
    over two steps; channels-last inputs too."""
    for sample in _module_samples(info, dtype, training, device):
        theirs, ours = _make_modules(theirs_cls, ours_cls, sample, dtype, device)
        theirs.train(training), ours.train(training)
        fwd = sample.forward_input
        formats = [None]
        if fwd.args and isinstance(fwd.args[0], torch.Tensor) and fwd.args[0].dim() in (4, 5):
            formats.append(torch.channels_last if fwd.args[0].dim() == 4 else torch.channels_last_3d)
        for fmt in formats:
            for _ in range(2):
                outs, grads = [], []
                for m, counted in ((theirs, False), (ours, True)):
                    args = _clone(fwd.args)
                    if fmt is not None:
                        args = (args[0].detach().contiguous(memory_format=fmt).requires_grad_(args[0].requires_grad),
                                *args[1:])
                    with count_fused_calls() as count:
                        y = m(*args, **_clone(fwd.kwargs))
                    assert count.n >= (1 if counted else 0) and (counted or count.n == 0)
                    dy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view(y.shape).sin()
                    wrt = _leaves(args) + [p for p in m.parameters() if p.requires_grad]
                    grads.append(torch.autograd.grad(y, wrt, dy, allow_unused=True) if wrt else ())
                    outs.append(y)
                assert outs[1].stride() == outs[0].stride() or outs[0].numel() == 0
                torch.testing.assert_close(outs[1], outs[0])
                # float32 gradient sums cancel: an absolute tolerance at their scale (dy <= 1)
                tol = {} if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
                for a, e in zip(grads[1], grads[0], strict=True):
                    torch.testing.assert_close(a, e, **tol)
                _assert_state_equal(ours, theirs)


@pytest.mark.parametrize("info,theirs_cls,ours_cls", MODULE_CASES, ids=MODULE_IDS)
def test_module_gradcheck(device, info, theirs_cls, ours_cls):
    """gradcheck, gradgradcheck, forward AD and forward over reverse on every float64
    sample, through the module's parameters and input, in training and eval."""
    for training in (True, False):
        for sample in _module_samples(info, torch.float64, training, device):
            _, ours = _make_modules(theirs_cls, ours_cls, sample, torch.float64, device)
            ours.train(training)
            args = _clone(sample.forward_input.args)
            if not _leaves(args):
                continue
            names = [n for n, p in ours.named_parameters()]
            params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
            state = {k: v.clone() for k, v in ours.state_dict().items()}

            def fn(*leaves):
                # Running statistics restored per call: gradcheck calls many times.
                buffers = {k: v.clone() for k, v in state.items() if k not in names}
                return torch.func.functional_call(ours, {**dict(zip(names, leaves[len(args):])), **buffers},
                                                  tuple(leaves[:len(args)]))

            inputs = (*args, *params)
            with count_fused_calls() as count:
                fn(*inputs)
            assert count.n >= 1
            assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=False,
                                            fast_mode=True)
            assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_batched_grad=False,
                                                fast_mode=True)


@pytest.mark.no_kernels
@pytest.mark.parametrize("info,theirs_cls,ours_cls", MODULE_CASES, ids=MODULE_IDS)
def test_module_errors(device, info, theirs_cls, ours_cls):
    """torch's error inputs raise the same errors with our class."""
    if info.module_error_inputs_func is None:
        pytest.skip("no error inputs")
    # (the error inputs are for a module as constructed, in training mode)
    for err in info.module_error_inputs_func(info, device=device, dtype=torch.float32, requires_grad=False,
                                             training=True):
        sample = err.module_error_input
        c = sample.constructor_input
        with pytest.raises(err.error_type, match=err.error_regex):
            m = ours_cls(*c.args, **c.kwargs).to(device)
            if err.error_on == ModuleErrorEnum.FORWARD_ERROR:
                with count_fused_calls() as count:
                    m(*_clone(sample.forward_input.args), **_clone(sample.forward_input.kwargs))
        if err.error_on == ModuleErrorEnum.FORWARD_ERROR:
            assert count.n == 0  # refused before the kernels, as torch's module does


@pytest.mark.parametrize("info,theirs_cls,ours_cls", MODULE_CASES, ids=MODULE_IDS)
def test_module_pickle_repr_state_dict_swap(device, info, theirs_cls, ours_cls):
    """repr and state_dict keys are torch's; pickling, deepcopy and module.to(swap=True)
    keep a working fused module that matches torch's after the conversion."""
    for sample in _module_samples(info, torch.float32, True, device):
        theirs, ours = _make_modules(theirs_cls, ours_cls, sample, torch.float32, device)
        assert repr(ours) == repr(theirs).replace(theirs_cls.__name__, ours_cls.__name__, 1)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        copies = [pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), torch.load(buf, weights_only=False)]
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            theirs.to(torch.float64)
            for m in (ours, *copies):
                m.to(torch.float64)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
        args = sample.forward_input.args
        if not args or not isinstance(args[0], torch.Tensor):
            continue
        x = args[0].detach().double()
        expected = theirs(x)
        for m in (ours, *copies):
            assert type(m) is ours_cls
            with count_fused_calls() as count:
                torch.testing.assert_close(m(x), expected)
            assert count.n >= 1


# --- OpInfos ----------------------------------------------------------------------------

OP_FNS = {"nn.functional.layer_norm": fused_norm.layer_norm, "nn.functional.batch_norm": fused_norm.batch_norm,
          "nn.functional.rms_norm": fused_norm.rms_norm}
OP_INFOS = [o for o in op_db if o.name in OP_FNS]
OP_IDS = [f"{o.name}{'.' + o.variant_test_name if o.variant_test_name else ''}" for o in OP_INFOS]


def _call(fn, sample):
    return fn(sample.input, *sample.args, **sample.kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("op", OP_INFOS, ids=OP_IDS)
def test_op_samples_match_torch(device, op, dtype):
    """Every sample (and its non-contiguous version): output values, dtype and strides,
    gradients and the running statistics it updates."""
    ours_fn = OP_FNS[op.name]
    for sample in op.sample_inputs(device, dtype, requires_grad=True):
        for s in (sample, sample.noncontiguous()):
            results = []
            for fn, counted in ((op.op, False), (ours_fn, True)):
                si = SampleInput(_clone(s.input), args=_clone(s.args), kwargs=_clone(s.kwargs))
                with count_fused_calls() as count:
                    y = _call(fn, si)
                if counted:
                    assert count.n >= 1
                wrt = _leaves([si.input, *si.args, *si.kwargs.values()])
                grads = torch.autograd.grad(y, wrt, torch.ones_like(y), allow_unused=True) if y.requires_grad else ()
                state = [a for a in (*si.args, *si.kwargs.values()) if isinstance(a, torch.Tensor)]
                results.append((y, grads, state))
            (ye, ge, se), (ya, ga, sa) = results
            assert ya.dtype == ye.dtype and ya.shape == ye.shape
            assert ya.stride() == ye.stride() or ye.numel() == 0
            # bfloat16 rounding; float32 gradient sums that cancel
            tol = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float32: dict(atol=1e-4, rtol=1e-4)}.get(dtype, {})
            torch.testing.assert_close(ya, ye, **tol)
            for a, e in zip(ga, ge, strict=True):
                torch.testing.assert_close(a, e, **tol)
            for a, e in zip(sa, se, strict=True):
                torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("op", OP_INFOS, ids=OP_IDS)
def test_op_gradcheck(device, op):
    """gradcheck with forward AD, gradgradcheck with forward over reverse, on every
    float64 sample."""
    ours_fn = OP_FNS[op.name]
    for sample in op.sample_inputs(device, torch.float64, requires_grad=True):
        leaves_at = [i for i, a in enumerate((sample.input, *sample.args)) if
                     isinstance(a, torch.Tensor) and a.requires_grad]
        if not leaves_at:
            continue
        flat = [sample.input, *sample.args]
        kwargs = sample.kwargs

        def fn(*leaves):
            # the other tensors (running statistics) cloned per call: gradcheck calls many times
            args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in flat]
            for i, t in zip(leaves_at, leaves):
                args[i] = t
            return ours_fn(*args, **_clone(kwargs))

        inputs = tuple(flat[i] for i in leaves_at)
        with count_fused_calls() as count:
            fn(*inputs)
        assert count.n >= 1
        assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=False, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True, check_batched_grad=False,
                                            fast_mode=True)


@pytest.mark.no_kernels
@pytest.mark.parametrize("op", OP_INFOS, ids=OP_IDS)
def test_op_error_inputs(device, op):
    ours_fn = OP_FNS[op.name]
    errors = list(op.error_inputs(device)) if op.error_inputs_func is not None else []
    if not errors:
        pytest.skip("no error inputs")
    for err in errors:
        with pytest.raises(err.error_type, match=err.error_regex):
            _call(ours_fn, err.sample_input)
