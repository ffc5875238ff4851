"""torch.func transforms over fused_norm, against the same transforms over torch's ops
(float64): reverse mode (grad, vjp, jacrev, vmap of grad, grad of grad) works; forward
mode (jvp, jacfwd, hessian) raises, as torch does for ops without a forward formula."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vjp, vmap

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


def test_per_sample_gradients_with_vmap(device):
    # The Opacus/functorch pattern: a gradient per sample of a LayerNorm model's weight.
    x, w, b = _args(device, (4, 6, 8), (8,))
    loss = lambda fn: (lambda w, b, xi: fn(xi, (8,), w, b).pow(3).sum())
    ours = vmap(grad(loss(fused_norm.layer_norm), (0, 1)), in_dims=(None, None, 0))(w, b, x)
    theirs = vmap(grad(loss(F.layer_norm), (0, 1)), in_dims=(None, None, 0))(w, b, x)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_mode_raises(device, case):
    _, ours, _, xs, ps = case
    args = _args(device, xs, ps)
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp(lambda x: ours(x, *args[1:]), (args[0],), (torch.ones_like(args[0]),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
        ours(args[0], fwAD.make_dual(args[1], torch.ones_like(args[1])), args[2])
