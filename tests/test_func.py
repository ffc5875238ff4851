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
