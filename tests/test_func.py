"""torch.func transforms over fused_norm, against the same transforms over torch's ops
(float64): reverse mode (grad, vjp, jacrev, vmap of grad, grad of grad) and forward mode
(jvp, jacfwd, hessian, torch.autograd.forward_ad) give torch's results."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fused_norm

F64 = torch.float64


def _layer_norm(fn):
    return lambda x, w, b: fn(x, (x.shape[-1],), w, b)


def _batch_norm(fn, training):
    return lambda x, w, b: fn(x, None, None, w, b, training=training) if training else fn(
        x, torch.linspace(-1, 1, x.shape[1], dtype=x.dtype, device=x.device),
        torch.linspace(0.5, 2, x.shape[1], dtype=x.dtype, device=x.device), w, b, training=False)


# (name, ours, theirs, x shape, parameter shape)
CASES = [
    ("layer_norm", _layer_norm(fused_norm.layer_norm), _layer_norm(F.layer_norm), (5, 7), (7,)),
    ("batch_norm-train", _batch_norm(fused_norm.batch_norm, True), _batch_norm(F.batch_norm, True), (6, 3, 5), (3,)),
    ("batch_norm-eval", _batch_norm(fused_norm.batch_norm, False), _batch_norm(F.batch_norm, False), (6, 3, 5), (3,)),
]
IDS = [c[0] for c in CASES]


def _args(device, xshape, pshape):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=F64).to(device) for s in (xshape, pshape, pshape)]


def _loss(f):
    # Not quadratic in y, so the second derivatives involve the statistics' derivatives.
    return lambda x, w, b: (f(x, w, b).pow(3) * torch.arange(x.numel(), dtype=x.dtype, device=x.device)
                            .view(x.shape).cos()).sum()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_and_vjp(device, case):
    _, ours, theirs, xs, ps = case
    args = _args(device, xs, ps)
    for argnums in ((0, 1, 2), 0, (1, 2)):
        torch.testing.assert_close(grad(_loss(ours), argnums)(*args), grad(_loss(theirs), argnums)(*args))
    cot = torch.randn(xs, dtype=F64, device=device)
    _, f_ours = vjp(ours, *args)
    _, f_theirs = vjp(theirs, *args)
    torch.testing.assert_close(f_ours(cot), f_theirs(cot))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jacrev_and_grad_of_grad(device, case):
    _, ours, theirs, xs, ps = case
    args = _args(device, xs, ps)
    torch.testing.assert_close(jacrev(ours, (0, 1))(*args), jacrev(theirs, (0, 1))(*args))
    # Second order: the gradient of a function of the first gradient.
    second = lambda f: grad(lambda x, w, b: grad(_loss(f), (0, 1))(x, w, b)[0].square().sum(), (0, 1, 2))
    torch.testing.assert_close(second(ours)(*args), second(theirs)(*args))


@pytest.fixture
def no_vmap_fallback():
    """vmap raises instead of falling back to a per-sample loop: the op's own batching
    rule must run."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


def test_vmap_layer_norm_like_torch(device, no_vmap_fallback):
    """The LayerNorm ops' batching rules: mapped input (first or inner dim), mapped
    per-sample weight and bias, a multi-dim normalized_shape, per-sample gradients, and a
    batched backward (is_grads_batched, which maps layer_norm_bwd)."""
    x, w, b = _args(device, (4, 6, 8), (8,))
    g = torch.Generator().manual_seed(2)
    W, B = (torch.randn(4, 8, generator=g, dtype=F64).to(device) for _ in range(2))

    def same(f):
        torch.testing.assert_close(f(fused_norm.layer_norm), f(F.layer_norm))

    same(lambda ln: vmap(lambda xi: ln(xi, (8,), w, b))(x))
    same(lambda ln: vmap(lambda xi: ln(xi, (8,), w, b), in_dims=1)(x))
    same(lambda ln: vmap(lambda xi: ln(xi, (6, 8), None, None))(x))
    same(lambda ln: vmap(lambda xi, wi, bi: ln(xi, (8,), wi, bi))(x, W, B))
    same(lambda ln: vmap(lambda wi: ln(x, (8,), wi, None))(W))
    loss = lambda ln: (lambda w, b, xi: ln(xi, (8,), w, b).pow(3).sum())
    same(lambda ln: vmap(grad(loss(ln), (0, 1)), in_dims=(None, None, 0))(w, b, x))
    same(lambda ln: vmap(grad(loss(ln), (0, 1, 2)))(W, B, x))

    def batched_backward(ln):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = ln(leaves[0], (8,), leaves[1], leaves[2])
        cotangents = torch.randn((3,) + y.shape, generator=g.manual_seed(3), dtype=F64).to(device)
        return torch.autograd.grad(y, leaves, cotangents, is_grads_batched=True)

    same(batched_backward)


@pytest.mark.parametrize("shape", [(3, 4, 5, 2, 3), (3, 4, 5)], ids=["2d", "1d"])
def test_vmap_batch_norm_like_torch(device, shape, no_vmap_fallback):
    """The BatchNorm ops' batching rules: per-sample statistics (training), eval with
    shared or per-sample running statistics and parameters, a mapped inner dim,
    per-sample gradients, a batched backward (is_grads_batched), and torch's error when
    the running statistics to update are not mapped."""
    g = torch.Generator().manual_seed(4)
    B, C = shape[0], shape[2]
    x = torch.randn(shape, generator=g, dtype=F64).to(device)
    w, b = (torch.randn(C, generator=g, dtype=F64).to(device) for _ in range(2))
    W, Bias = (torch.randn(B, C, generator=g, dtype=F64).to(device) for _ in range(2))
    rm, rv = torch.randn(C, dtype=F64, generator=g).to(device), torch.rand(C, dtype=F64, generator=g).to(device) + 0.5
    RM, RV = rm.expand(B, C) + 0.1 * torch.arange(B, device=device)[:, None], rv.expand(B, C).contiguous()

    def same(f):
        torch.testing.assert_close(f(fused_norm.batch_norm), f(F.batch_norm))

    same(lambda bn: vmap(lambda xi: bn(xi, None, None, w, b, training=True))(x))
    same(lambda bn: vmap(lambda xi: bn(xi, None, None, w, b, training=True), in_dims=1)(x.movedim(0, 1)))
    same(lambda bn: vmap(lambda xi, wi, bi: bn(xi, None, None, wi, bi, training=True))(x, W, Bias))
    same(lambda bn: vmap(lambda xi: bn(xi, rm, rv, w, b, training=False))(x))
    same(lambda bn: vmap(lambda xi, mi, vi, wi: bn(xi, mi, vi, wi, None, training=False))(x, RM, RV, W))

    def updated(bn):  # per-sample running statistics updated in place
        m, v = RM.clone(), RV.clone()
        y = vmap(lambda xi, mi, vi: bn(xi, mi, vi, w, b, training=True, momentum=0.3))(x, m, v)
        return y, m, v

    same(updated)
    loss = lambda bn: (lambda w, b, xi: bn(xi, None, None, w, b, training=True).pow(3).sum())  # noqa: E731
    same(lambda bn: vmap(grad(loss(bn), (0, 1, 2)), in_dims=(None, None, 0))(w, b, x))

    def batched_backward(bn, training):
        leaves = [t.clone().requires_grad_() for t in (x[0], w, b)]
        y = bn(leaves[0], rm, rv, leaves[1], leaves[2], training=training)
        cotangents = torch.randn((3,) + y.shape, generator=g.manual_seed(5), dtype=F64).to(device)
        return torch.autograd.grad(y, leaves, cotangents, is_grads_batched=True)

    for training in (True, False):
        same(lambda bn: batched_backward(bn, training))
    with pytest.raises(RuntimeError, match="batched tensor as input while the running_mean or running_var"):
        vmap(lambda xi: fused_norm.batch_norm(xi, rm.clone(), rv.clone(), training=True))(x)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_vmap_model_ensemble_batch_norm(device, momentum, no_vmap_fallback):
    """Model ensembling (torch.func.stack_module_state + functional_call under vmap) of
    training-mode FusedBatchNorm2d: outputs and every updated buffer (running statistics,
    num_batches_tracked) as torch's BatchNorm2d gives them run model by model (torch's own
    module cannot run under vmap with momentum=None: it calls .item() on
    num_batches_tracked; ours reads a per-model num_batches_tracked)."""
    from torch.func import functional_call, stack_module_state

    def models(cls):
        torch.manual_seed(0)
        ms = [cls(4, momentum=momentum).to(device, F64) for _ in range(3)]
        for i, m in enumerate(ms):
            m.num_batches_tracked.fill_(i)
            m.weight.data.normal_()
            m.bias.data.normal_()
        return ms

    xs = [torch.randn(3, 6, 4, 2, 2, dtype=F64, device=device) for _ in range(2)]
    ours = models(fused_norm.FusedBatchNorm2d)
    params, buffers = stack_module_state(ours)
    out = [vmap(lambda p, bf, xi: functional_call(ours[0], (p, bf), (xi,)))(params, buffers, x) for x in xs]
    theirs = models(torch.nn.BatchNorm2d)
    ref = [torch.stack([m(xi) for m, xi in zip(theirs, x)]) for x in xs]
    torch.testing.assert_close(out, ref)
    for name, t in buffers.items():
        torch.testing.assert_close(t, torch.stack([m.get_buffer(name) for m in theirs]), msg=name)


def test_per_sample_gradients_with_vmap(device):
    # The Opacus/functorch pattern: a gradient per sample of a LayerNorm model's weight.
    x, w, b = _args(device, (4, 6, 8), (8,))
    loss = lambda fn: (lambda w, b, xi: fn(xi, (8,), w, b).pow(3).sum())
    ours = vmap(grad(loss(fused_norm.layer_norm), (0, 1)), in_dims=(None, None, 0))(w, b, x)
    theirs = vmap(grad(loss(F.layer_norm), (0, 1)), in_dims=(None, None, 0))(w, b, x)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_mode_like_torch(device, case):
    """jvp (tangents of every input, and of each alone), jacfwd, hessian (forward over
    reverse), reverse over forward, and torch.autograd.forward_ad dual tensors."""
    _, ours, theirs, xs, ps = case
    args = _args(device, xs, ps)
    g = torch.Generator().manual_seed(1)
    tangents = [torch.randn(a.shape, generator=g, dtype=F64).to(device) for a in args]
    for keep in ((0, 1, 2), (0,), (1,), (2,)):
        t = tuple(tangents[i] if i in keep else torch.zeros_like(a) for i, a in enumerate(args))
        torch.testing.assert_close(jvp(ours, tuple(args), t), jvp(theirs, tuple(args), t))
    torch.testing.assert_close(jacfwd(ours, (0, 1, 2))(*args), jacfwd(theirs, (0, 1, 2))(*args))

    def dual_tangent(fn):  # tangents on x and the weight, none on the bias
        with fwAD.dual_level():
            y = fn(fwAD.make_dual(args[0], tangents[0]), fwAD.make_dual(args[1], tangents[1]), args[2])
            return fwAD.unpack_dual(y).tangent

    torch.testing.assert_close(dual_tangent(ours), dual_tangent(theirs))

    # The second-order references come from torch's plain autograd (double backward, no
    # vmap): in torch 2.13, torch.func.hessian and jacrev(jacrev(...)) of F.layer_norm and
    # of training F.batch_norm disagree with it in the d(dL/dweight)/dx block (LayerNorm:
    # off by up to 2.5 against finite differences, and not the transpose of the
    # d(dL/dx)/dweight block), and jacfwd or jacrev of jacfwd of F.layer_norm is off by up
    # to 1.07; ours agrees with plain autograd (and, for LayerNorm, finite differences).
    # Smaller tensors here: these references take one backward per element.
    small_xs = tuple(min(d, 3) for d in xs)
    small = _args(device, small_xs, (small_xs[-1],) if ps[0] == xs[-1] else (small_xs[1],))
    w_b = lambda f: (lambda x, w: f(x, w, small[2]))
    torch.testing.assert_close(hessian(_loss(ours), (0, 1))(*small),
                               torch.autograd.functional.hessian(w_b(_loss(theirs)), tuple(small[:2])))
    jac_x = lambda x: torch.autograd.functional.jacobian(lambda x: theirs(x, *small[1:]), x, create_graph=True)
    expected = torch.autograd.functional.jacobian(jac_x, small[0])
    torch.testing.assert_close(jacrev(jacfwd(ours))(*small), expected)
    torch.testing.assert_close(jacfwd(jacfwd(ours))(*small), expected)
