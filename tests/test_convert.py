"""fused_norm.convert_model: which modules it converts, and that a converted model is the
same model (options, Parameter/buffer objects, optimizer, modes, dtypes, hooks,
state_dict) computing the same results as before."""

import copy
import itertools
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fused_norm
from fused_norm import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedLayerNorm, convert_model

PAIRS = [(nn.LayerNorm, FusedLayerNorm), (nn.BatchNorm1d, FusedBatchNorm1d), (nn.BatchNorm2d, FusedBatchNorm2d),
         (nn.BatchNorm3d, FusedBatchNorm3d)]
LN_OPTIONS = ("normalized_shape", "eps", "elementwise_affine")
BN_OPTIONS = ("num_features", "eps", "momentum", "affine", "track_running_stats")


def _randomize(module, seed=0):
    """Non-trivial parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return module


def _run_both(original, converted, inputs, train_steps=3):
    """Training steps (outputs, input and parameter gradients each step), then eval, for
    the unconverted module and the converted copy; then buffers and parameters."""
    for training, xs in ((True, inputs[:train_steps]), (False, inputs[train_steps:])):
        original.train(training)
        converted.train(training)
        for x in xs:
            outs = []
            for m in (original, converted):
                m.zero_grad()
                leaf = x.detach().clone().requires_grad_()
                y = m(leaf)
                y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype).view(y.shape)))
                outs.append([y, leaf.grad] + [p.grad for p in m.parameters()])
            for a, b in zip(*outs):
                torch.testing.assert_close(b, a)
    for (name, a), b in zip(original.named_buffers(), converted.buffers()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.parametrize("normalized_shape", [8, (3, 8)], ids=["8", "3x8"])
def test_layer_norm_every_option(normalized_shape):
    for eps, affine, bias in itertools.product((1e-5, 1e-2), (True, False), (True, False)):
        original = _randomize(nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=affine, bias=bias))
        converted = copy.deepcopy(original)
        before = {k: getattr(converted, k) for k in LN_OPTIONS}
        assert convert_model(converted) is converted
        assert type(converted) is FusedLayerNorm
        assert {k: getattr(converted, k) for k in LN_OPTIONS} == before
        assert (converted.weight is None, converted.bias is None) == (not affine, not (affine and bias))
        assert repr(converted) == "Fused" + repr(original)
        _run_both(original, converted, [torch.randn(5, 3, 8) * 3 + 1 for _ in range(4)], train_steps=2)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_batch_norm_every_option(d):
    """Every combination of eps, momentum (None: cumulative average), affine, bias and
    track_running_stats behaves as before the conversion, over training steps and eval."""
    cls = getattr(nn, f"BatchNorm{d}d")
    shape = {1: (6, 4, 5), 2: (3, 4, 5, 2), 3: (2, 4, 3, 2, 2)}[d]
    for eps, momentum, affine, bias, track in itertools.product(
            (1e-5, 1e-1), (0.1, 0.7, None), (True, False), (True, False), (True, False)):
        original = _randomize(cls(4, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                                  bias=bias))
        converted = copy.deepcopy(original)
        before = {k: getattr(converted, k) for k in BN_OPTIONS}
        assert convert_model(converted) is converted
        assert type(converted) is getattr(fused_norm, f"FusedBatchNorm{d}d")
        after = {k: getattr(converted, k) for k in BN_OPTIONS}
        assert after == before and (after["momentum"] is None) == (momentum is None)
        assert (converted.bias is None) == (not (affine and bias))
        assert repr(converted) == "Fused" + repr(original)
        _run_both(original, converted, [torch.randn(shape) * 2 - 1 for _ in range(5)])
        if track:
            assert converted.num_batches_tracked.item() == 3


@pytest.mark.parametrize("torch_cls,fused_cls", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_fused_class_needs_nothing_beyond_the_torch_instance(torch_cls, fused_cls):
    """Changing an instance's class is a complete conversion only while the fused class
    adds no state of its own: a fused module built directly has exactly the instance
    attributes (and class attributes that matter) of the torch module."""
    for kwargs in ({}, dict(eps=1e-3), {"elementwise_affine" if torch_cls is nn.LayerNorm else "affine": False}):
        theirs, ours = torch_cls(6, **kwargs), fused_cls(6, **kwargs)
        assert vars(ours).keys() == vars(theirs).keys()
        assert {k: v for k, v in vars(ours).items() if not k.startswith("_")} == \
            {k: v for k, v in vars(theirs).items() if not k.startswith("_")}
        assert ours._version == theirs._version and ours.__constants__ == theirs.__constants__
    # The classes between the fused class and torch's define forward and nothing else.
    mro = fused_cls.__mro__
    for cls in mro[:mro.index(torch_cls)]:
        # Python 3.10+ stores an empty __annotations__ in a class when something reads it
        # (TorchScript does, when a test before this one scripted the class).
        empty = {"__annotations__"} if not vars(cls).get("__annotations__", True) else set()
        assert set(vars(cls)) - {"forward"} - empty <= {"__module__", "__doc__", "__qualname__", "__dict__", "__weakref__",
                                                "__firstlineno__", "__static_attributes__"}, cls


def _model():
    """Norms at several depths inside Sequential, ModuleList and ModuleDict, one of them
    shared; no parameter with a gradient that is zero but for rounding (such as a bias
    just before a BatchNorm), which Adam would turn into full-size steps."""
    torch.manual_seed(0)
    shared = nn.LayerNorm(16)
    model = nn.Sequential(
        nn.Conv1d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm1d(16),
        nn.ModuleList([
            nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU()),
            nn.ModuleDict({"bn3": nn.BatchNorm3d(8, affine=False), "ln": shared,
                           "deep": nn.Sequential(nn.Sequential(nn.LayerNorm(16, bias=False)))}),
        ]),
        nn.LayerNorm([16, 5]),
    )
    model.extra = shared
    return model


class _Net(nn.Module):
    """Runs every layer of _model()."""

    def __init__(self):
        super().__init__()
        self.m = _model()

    def forward(self, x):
        m = self.m
        h = m[1](m[0](x))                                     # (N, 16, 5)
        a = m[2][0](h.unsqueeze(-1))                          # (N, 8, 5, 1)
        a = m[2][1]["bn3"](a.unsqueeze(-1))                   # (N, 8, 5, 1, 1)
        t = m[2][1]["ln"](h.transpose(1, 2))                  # (N, 5, 16)
        t = m[2][1]["deep"](t) + m.extra(t)
        return m[3](t.transpose(1, 2) + a.flatten(2).sum(1, keepdim=True))


def test_nested_containers_and_shared_modules():
    net = _Net()
    before = {name: type(m) for name, m in net.named_modules(remove_duplicate=False)}
    modules_before = dict(net.named_modules(remove_duplicate=False))
    assert convert_model(net) is net
    expected = dict((t, f) for t, f in PAIRS)
    for name, m in net.named_modules(remove_duplicate=False):
        assert m is modules_before[name], name
        assert type(m) is expected.get(before[name], before[name]), name
    assert sum(type(m) in expected.values() for m in net.modules()) == 6
    assert net.m.extra is net.m[2][1]["ln"]


def test_same_parameters_buffers_and_state_dict():
    net = _Net()
    params = list(net.named_parameters())
    buffers = list(net.named_buffers())
    state = net.state_dict()
    convert_model(net)
    assert [(n, id(p)) for n, p in net.named_parameters()] == [(n, id(p)) for n, p in params]
    assert [(n, id(b)) for n, b in net.named_buffers()] == [(n, id(b)) for n, b in buffers]
    after = net.state_dict()
    assert list(after) == list(state)
    for k in state:
        assert after[k].data_ptr() == state[k].data_ptr() and torch.equal(after[k], state[k]), k
    # Checkpoints load both ways.
    back = _Net()
    back.load_state_dict(after)
    net.load_state_dict(back.state_dict())


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_built_before_conversion(opt):
    """An optimizer (with momentum state) built on the model before the conversion steps
    the converted model exactly like an unconverted copy with its own optimizer (in
    float64, so that rounding differences between the kernels stay far below the tolerance)."""
    net = _Net().double()
    reference = copy.deepcopy(net)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt == "sgd" else \
        (lambda p: torch.optim.AdamW(p, lr=1e-2))
    optimizer, ref_optimizer = make(net.parameters()), make(reference.parameters())
    convert_model(net)
    torch.manual_seed(1)
    for step in range(3):
        x, target = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 16, 5, dtype=torch.float64)
        for m, o in ((reference, ref_optimizer), (net, optimizer)):
            o.zero_grad()
            (m(x) * target).sum().backward()
            o.step()
        for (name, a), b in zip(reference.named_parameters(), net.parameters()):
            torch.testing.assert_close(b, a, msg=name)
    assert all(p.grad is not None for p in net.parameters())
    for (name, a), b in zip(reference.named_buffers(), net.buffers()):
        torch.testing.assert_close(b, a, msg=name)
    assert set(map(id, optimizer.state)) == set(map(id, net.parameters()))


def test_modes_and_dtypes_kept():
    net = _Net()
    net.m[1].eval()
    net.m[2][1].to(torch.float64)
    net.m[3].to(torch.bfloat16)
    before = [(m.training, [(t.dtype, t.device) for t in itertools.chain(m.parameters(False), m.buffers(False))])
              for m in net.modules()]
    convert_model(net)
    after = [(m.training, [(t.dtype, t.device) for t in itertools.chain(m.parameters(False), m.buffers(False))])
             for m in net.modules()]
    assert after == before
    assert not net.m[1].training and net.m[2][0][1].training


def test_root_norm_converted_in_place():
    for torch_cls, fused_cls in PAIRS:
        m = torch_cls(4)
        weight = m.weight
        assert convert_model(m) is m and type(m) is fused_cls and m.weight is weight


def test_leaves_unknown_subclasses_sync_and_fused_alone():
    class MyLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class MyBatchNorm(nn.BatchNorm2d):
        pass

    parametrized = nn.LayerNorm(4)
    parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    model = nn.ModuleList([
        MyLayerNorm(4), MyBatchNorm(4), nn.SyncBatchNorm(4), nn.LazyBatchNorm2d(), parametrized,
        FusedLayerNorm(4), FusedBatchNorm2d(4), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.LocalResponseNorm(2),
    ])
    types = [type(m) for m in model.modules()]
    convert_model(model)
    assert [type(m) for m in model.modules()] == types
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(model[0](x.transpose(1, 3)), 2 * nn.functional.layer_norm(x.transpose(1, 3), (4,)))


def test_lazy_batch_norm_after_materialization():
    """LazyBatchNorm2d turns into a plain nn.BatchNorm2d on its first forward; from then on
    it is converted."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(momentum=None))
    model(torch.randn(2, 3, 4, 4))
    assert type(model[1]) is nn.BatchNorm2d
    reference = copy.deepcopy(model)
    convert_model(model)
    assert type(model[1]) is FusedBatchNorm2d
    _run_both(reference, model, [torch.randn(2, 3, 4, 4) for _ in range(4)])


def test_hooks_and_attributes_kept():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm1d(6))
    calls = []
    ln, bn = model[1], model[2]
    ln.custom_tag = "keep me"
    handles = [
        ln.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__name__))),
        ln.register_forward_hook(lambda m, args, out: calls.append(("post", type(m).__name__)) or out * 3),
        bn.register_forward_hook(lambda m, args, kwargs, out: calls.append(("kw", type(m).__name__)),
                                 with_kwargs=True),
        bn.register_full_backward_hook(lambda m, gin, gout: calls.append(("bwd", type(m).__name__))),
        ln.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append(("sd", type(m).__name__))),
    ]
    reference = copy.deepcopy(model)
    convert_model(model)
    assert ln.custom_tag == "keep me"
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), reference(x))  # the hook's * 3 applies in both
    model(x).sum().backward()
    model.state_dict()
    assert calls[-5:] == [("pre", "FusedLayerNorm"), ("post", "FusedLayerNorm"), ("kw", "FusedBatchNorm1d"),
                          ("bwd", "FusedBatchNorm1d"), ("sd", "FusedLayerNorm")]
    for h in handles:
        h.remove()
    calls.clear()
    model(x).sum().backward()
    model.state_dict()
    assert calls == []


def test_instance_forward_override_is_left_alone_with_a_warning():
    model = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4))
    original_forward = model[1].forward
    model[1].forward = lambda x: original_forward(x) + 1
    with pytest.warns(UserWarning, match=r"left 1 \(LayerNorm\) unconverted"):
        convert_model(model)
    assert type(model[0]) is FusedLayerNorm and type(model[1]) is nn.LayerNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_model(nn.Sequential(nn.LayerNorm(4)))


def test_converted_model_copies_pickles_and_loads():
    net = convert_model(_Net())
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert [type(m) for m in clone.modules()] == [type(m) for m in net.modules()]
        x = torch.randn(3, 3, 5)
        net.eval()
        clone.eval()
        torch.testing.assert_close(clone(x), net(x))


def test_converted_model_compiles_fullgraph():
    net = convert_model(_Net())
    reference = copy.deepcopy(net)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x, target = torch.randn(4, 3, 5), torch.randn(4, 16, 5)
        outs = []
        for m in (reference, compiled):
            m.zero_grad()
            y = m(x)
            (y * target).sum().backward()
            outs.append([y] + [p.grad for p in m.parameters()] + list(m.buffers()))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a)


def test_model_compiled_before_conversion_recompiles():
    """torch.compile guards on each module's type, so a model compiled before the
    conversion is traced again on its next call, now with fused_norm's ops."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.BatchNorm1d(8))
    reference = copy.deepcopy(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 4)
    compiled(x)
    reference(x)
    convert_model(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), reference(x))
    assert len(graphs) == 2 and "fused_norm" not in graphs[0]
    assert "fused_norm.layer_norm_fwd" in graphs[1] and "fused_norm.batch_norm_fwd" in graphs[1]


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        convert_model([nn.LayerNorm(3)])
