"""Real model code, unchanged: Hugging Face BERT (LayerNorm after the residual add) and
ResNet (BatchNorm2d, NCHW and channels_last), built from tiny configs with random weights
(nothing is downloaded), converted with fused_norm.convert_model and compared with the
unconverted model: training steps, eval, torch.compile and CPU autocast."""

import contextlib
import copy
import functools
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import fused_norm  # noqa: E402
from conftest import CUDA_OK, count_fused_calls, torch_norm_class  # noqa: E402

NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
FUSED = (fused_norm.FusedLayerNorm, fused_norm.FusedBatchNorm1d, fused_norm.FusedBatchNorm2d,
         fused_norm.FusedBatchNorm3d)


def _perturb_norms(model, seed):
    """HF initializes norms to weight 1, bias 0 (and running stats 0/1): move them away so
    that the affine parameters and the running statistics matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, name, None)
                    if t is not None:
                        t.add_(torch.rand(t.shape, generator=g) * 0.2)
    return model


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32, num_labels=3,
        problem_type="single_label_classification")  # else set by the first call: a recompile
    model = _perturb_norms(transformers.BertForSequenceClassification(config), 1)

    def inputs(seed, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, 8:] = 0  # padding
        return dict(input_ids=torch.randint(0, 100, (3, 12), generator=g).to(device),
                    token_type_ids=(torch.arange(12) >= 6).long().expand(3, 12).to(device),
                    attention_mask=mask.to(device),
                    labels=torch.randint(0, 3, (3,), generator=g).to(device))

    return model, inputs


def _resnet(channels_last=False):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=3, problem_type="single_label_classification")
    model = _perturb_norms(transformers.ResNetForImageClassification(config), 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)

    def inputs(seed, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        return dict(pixel_values=torch.randn(4, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt),
                    labels=torch.randint(0, 3, (4,), generator=g).to(device))

    return model, inputs


MODELS = {"bert": _bert, "resnet": _resnet, "resnet_channels_last": lambda: _resnet(channels_last=True)}


def _convert_copy(model):
    converted = fused_norm.convert_model(copy.deepcopy(model))
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, NORMS)]
    assert kinds and [type(m).__name__ for m in converted.modules() if isinstance(m, FUSED)] == \
        ["Fused" + k for k in kinds]
    return converted


@contextlib.contextmanager
def _record_norms(model):
    """Records, for each norm call, the input dtype and the output's dtype, shape and strides."""
    seen = []
    hooks = [m.register_forward_hook(
        lambda mod, args, out, name=name: seen.append((name, args[0].dtype, out.dtype, out.shape, out.stride())))
        for name, m in model.named_modules() if isinstance(m, NORMS)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _step(model, inputs, backward=True):
    with _record_norms(model) as norms:
        out = model(**inputs)
    if backward:
        out.loss.backward()
    return out, norms


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_same(original, converted, what, **tol):
    assert converted.dtype == original.dtype and converted.shape == original.shape, what
    torch.testing.assert_close(converted, original, msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_and_eval_match_unconverted(name):
    """3 SGD steps in training mode (logits, loss, every parameter gradient, then the
    parameters and running statistics), then eval (outputs and gradients)."""
    model, make_inputs = MODELS[name]()
    converted = _convert_copy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, converted)]
    for training, steps in ((True, 3), (False, 1)):
        for step in range(steps):
            inputs = make_inputs(10 * step + training)
            results = []
            for m, opt in zip((model, converted), optimizers):
                m.train(training)
                opt.zero_grad()
                results.append(_step(m, inputs))
            (out_a, norms_a), (out_b, norms_b) = results
            assert norms_b == norms_a  # same dtypes, shapes and memory formats, call by call
            _assert_same(out_a.logits, out_b.logits, "logits")
            _assert_same(out_a.loss, out_b.loss, "loss")
            ga, gb = _grads(model), _grads(converted)
            assert all(g is not None for g in ga.values())
            for k in ga:
                _assert_same(ga[k], gb[k], f"grad {k}")
            if training:
                for opt in optimizers:
                    opt.step()
        for (k, a), b in zip(model.named_parameters(), converted.parameters()):
            _assert_same(a, b, k)
        for (k, a), b in zip(model.named_buffers(), converted.buffers()):
            _assert_same(a, b, k)
    if name.startswith("resnet"):
        bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.num_batches_tracked.item() == 3 for m in bns)
        if name.endswith("channels_last"):
            x = make_inputs(0)["pixel_values"]
            assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            assert all(n[4] == torch.empty(n[3]).contiguous(memory_format=torch.channels_last).stride()
                       for n in norms_b)


def _graph_breaks(model, inputs):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    code = "\n".join(g.code for g in explained.graphs)
    return explained.graph_break_count, code


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compile(name, training):
    """torch.compile: the converted model has no more graph breaks than the original (its
    graphs call fused_norm's ops, not aten's norms), and the compiled converted model
    (aot_eager backend: our fake kernels and autograd, torch's other kernels) gives the
    outputs and gradients of the eager unconverted model, with the same running statistics."""
    model, make_inputs = MODELS[name]()
    model.train(training)
    converted = _convert_copy(model)
    breaks, code = _graph_breaks(copy.deepcopy(model), make_inputs(0))
    breaks_fused, code_fused = _graph_breaks(copy.deepcopy(converted), make_inputs(0))
    assert breaks_fused <= breaks
    norm_op = "layer_norm" if name == "bert" else "batch_norm"
    assert f"torch.ops.fused_norm.{norm_op}_fwd" in code_fused
    assert f"torch.ops.fused_norm.{norm_op}_fwd" not in code and norm_op in code
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="aot_eager")
    for step in range(2):
        inputs = make_inputs(step + 1)
        model.zero_grad()
        converted.zero_grad()
        expected, got = model(**inputs), compiled(**inputs)
        expected.loss.backward()
        got.loss.backward()
        _assert_same(expected.logits, got.logits, "logits")
        ga, gb = _grads(model), _grads(converted)
        for k in ga:
            _assert_same(ga[k], gb[k], f"grad {k}")
    for (k, a), b in zip(model.named_buffers(), converted.buffers()):
        _assert_same(a, b, k)


_NO_CUDA = pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels")
AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"), pytest.param("cpu", torch.float16, id="cpu-fp16"),
            pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_NO_CUDA),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=_NO_CUDA)]


@contextlib.contextmanager
def _record_norm_grads(model):
    """For each norm call (each norm is called once, and is the only consumer of its
    input): the module, its input, and after backward the gradients of its output and of
    its input (tensor hooks; the output hook sees the gradient from before any in-place
    change made to the output downstream)."""
    calls = {}

    def forward_hook(mod, args, out, name):
        call = calls[name] = dict(module=mod, x=args[0].detach())
        out.register_hook(lambda g: call.update(dy=g))
        args[0].register_hook(lambda g: call.update(dx=g))

    hooks = [m.register_forward_hook(functools.partial(forward_hook, name=name))
             for name, m in model.named_modules() if isinstance(m, NORMS)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _assert_norm_grads_match_torch(calls, device, amp_dtype):
    """Each of our norms against torch's own module (a copy of ours, same parameters and
    running statistics) on the very input and output gradient ours got: the input gradient
    within 2 ulps of its largest value in fp16/bf16 (16 in float32, where the order of the
    row sums shows), the parameter gradients within 1e-5 of theirs."""
    assert calls
    for name, c in calls.items():
        ours = c["module"]
        ref = copy.deepcopy(ours)
        for p in ref.parameters():
            p.grad = None
        x = c["x"].clone().requires_grad_()
        with torch.autocast(device, dtype=amp_dtype):
            y = torch_norm_class(ours).forward(ref, x)
        y.backward(c["dy"])
        ulps = 16 if x.dtype == torch.float32 else 2
        got = [("input", c["dx"], x.grad, ulps * torch.finfo(x.dtype).eps)]
        got += [(k, p.grad, q.grad, 1e-5) for (k, p), q in zip(ours.named_parameters(), ref.parameters())]
        for what, a, b, rel in got:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, what)
            atol = rel * b.abs().max().float().clamp_min(1e-3).item()
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=atol,
                                       msg=lambda m: f"{name} grad of {what}: {m}")


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
@pytest.mark.parametrize("name", ["bert", "resnet_channels_last"])
def test_autocast(name, device, amp_dtype):
    """Under torch.autocast each norm sees and returns the dtypes torch's norm does, the
    outputs and running statistics match the unconverted model within low-precision
    tolerance, and each norm's gradients match torch's norm on the same input and output
    gradient.

    The parameter gradients of the two whole models are not compared: in the low
    precision they are dominated by amplified rounding. Multiplying the weight of one
    BatchNorm of the unconverted ResNet by (1 + eps) moves a conv weight gradient by 24% of
    its largest value in fp16 (28% in bf16), and each model's error against a float64 run
    is 6-32% there, for torch's norms and ours alike."""
    model, make_inputs = MODELS[name]()
    model.to(device)
    converted = _convert_copy(model)
    for training in (True, False):
        inputs = make_inputs(5, device)
        results, calls = [], []
        for m in (model, converted):
            m.train(training)
            m.zero_grad()
            with _record_norm_grads(m) as c:
                with torch.autocast(device, dtype=amp_dtype):
                    results.append(_step(m, inputs, backward=False))
                results[-1][0].loss.backward()
            calls.append(c)
        (out_a, norms_a), (out_b, norms_b) = results
        assert norms_b == norms_a
        # Every BatchNorm follows a conv and runs in the low precision; every LayerNorm of
        # BERT gets float32 (embeddings sum, residual adds promote) or, on CUDA, casts to it.
        assert {n[2] for n in norms_a} == ({amp_dtype} if name.startswith("resnet") else {torch.float32})
        tol = dict(rtol=2e-2, atol=2e-2)  # relative to the largest value
        scale = out_a.logits.detach().abs().max()
        _assert_same(out_a.logits / scale, out_b.logits / scale, "logits", **tol)
        # The unconverted model's norms too: the recorded gradients are torch's own, so
        # this checks the recording (a hook that saw the wrong gradient would fail it).
        for c in calls:
            _assert_norm_grads_match_torch(c, device, amp_dtype)
        for (k, a), b in zip(model.named_buffers(), converted.buffers()):
            _assert_same(a, b, k, **tol)


def _sgd_steps_match(model, converted, make_inputs, fused_calls):
    """3 SGD steps of the model and its converted copy side by side: the same logits, loss
    and gradients at each step and the same parameters after; the converted model makes
    fused_calls op calls per step (forward and backward) and the original none."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, converted)]
    for step in range(3):
        inputs = make_inputs(step)
        outs = []
        for m, opt in zip((model, converted), optimizers):
            opt.zero_grad()
            with count_fused_calls() as calls:
                out = m(**inputs)
                out.loss.backward()
            outs.append((out, calls.n))
        (out_a, n_a), (out_b, n_b) = outs
        assert n_a == 0 and n_b == fused_calls
        _assert_same(out_a.logits, out_b.logits, "logits")
        _assert_same(out_a.loss, out_b.loss, "loss")
        ga, gb = _grads(model), _grads(converted)
        for k in ga:
            _assert_same(ga[k], gb[k], f"grad {k}")
        for opt in optimizers:
            opt.step()
    for (k, a), b in zip(model.named_parameters(), converted.parameters()):
        _assert_same(a, b, k)


def test_bert_fused_add_norm_matches_unconverted():
    """fuse_add_norm on a BERT (post-norm: LayerNorm(hidden_states + input_tensor) in
    BertSelfOutput / BertOutput) and convert_model for its other LayerNorm: 3 SGD steps
    give the unconverted model's logits, loss, gradients and parameters; every
    add-and-norm runs fused."""
    model, make_inputs = _bert()
    converted = fused_norm.convert_model(fused_norm.fuse_add_norm(copy.deepcopy(model)))
    layers = [m for m in converted.modules() if type(m).__name__.startswith("FusedAddNormBert")]
    assert len(layers) == 4 and all(isinstance(m.LayerNorm, nn.LayerNorm) for m in layers)
    assert converted.state_dict().keys() == model.state_dict().keys()
    # forward and backward of 4 add+norms and the embeddings' norm
    _sgd_steps_match(model, converted, make_inputs, fused_calls=2 * (4 + 1))


def test_bert_fused_add_norm_under_autocast():
    """Under CPU autocast the dense layers' bfloat16 outputs meet the float32 residual
    stream: the fused layers run the add + LayerNorm in float32 (both cast up exactly, as
    the unfused sum promotes) and give the unconverted model's float32 outputs, loss and
    gradients (the kernel's float32 LayerNorm rounds differently from torch's in the
    last bits)."""
    model, make_inputs = _bert()
    converted = fused_norm.fuse_add_norm(copy.deepcopy(model))
    results = []
    for m in (model, converted):
        seen = []
        hooks = [layer.output.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
                 for layer in m.bert.encoder.layer]
        with count_fused_calls() as calls:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(**make_inputs(0))
            out.loss.backward()
        for h in hooks:
            h.remove()
        results.append((out, seen, calls.n))
    (out_a, seen_a, n_a), (out_b, seen_b, n_b) = results
    assert n_a == 0 and n_b == 2 * 4  # forward and backward of the 4 add-and-norms
    assert seen_a == seen_b == [torch.float32] * 2
    _assert_same(out_a.logits, out_b.logits, "logits", rtol=1e-4, atol=1e-5)
    _assert_same(out_a.loss, out_b.loss, "loss", rtol=1e-4, atol=1e-5)
    for (k, p), q in zip(model.named_parameters(), converted.parameters(), strict=True):
        assert q.grad.dtype == p.grad.dtype, k
        _assert_same(p.grad, q.grad, f"grad {k}", rtol=1e-3, atol=1e-4)


def test_fuse_add_norm_leaves_others_alone():
    model, _ = _bert()
    layer = model.bert.encoder.layer[0]
    layer.output.forward = layer.output.forward  # replaced on the instance
    sub = type("MySelfOutput", (type(layer.attention.output),), {})
    layer.attention.output.__class__ = sub
    fused_norm.fuse_add_norm(model)
    assert type(layer.output).__name__ == "BertOutput" and type(layer.attention.output) is sub
    assert type(model.bert.encoder.layer[1].output).__name__ == "FusedAddNormBertOutput"
    assert type(model.bert.embeddings.LayerNorm) is nn.LayerNorm


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand(p.shape) * 0.2)

    def make_inputs(step):
        ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(step))
        return dict(input_ids=ids, labels=ids)

    return model, make_inputs


def test_llama_fused_add_norm_matches_unconverted():
    """fuse_add_norm on a Llama decoder (pre-norm RMSNorm: the residual after the attention
    and post_attention_layernorm fused into add_rms_norm): 3 SGD steps give the unconverted
    model's logits, loss, gradients and parameters."""
    model, make_inputs = _llama()
    converted = fused_norm.fuse_add_norm(copy.deepcopy(model))
    assert [type(m).__name__ for m in converted.model.layers] == ["FusedAddNormLlamaDecoderLayer"] * 2
    assert converted.state_dict().keys() == model.state_dict().keys()
    _sgd_steps_match(model, converted, make_inputs, fused_calls=2 * 2)  # one add+norm per layer, both ways


def _fused_add_norm_model(name):
    """A BERT (fuse_add_norm and convert_model: 5 fused norms) or Llama (fuse_add_norm: 2)
    converted, in eval mode, with its inputs and its fused op calls per forward."""
    if name == "bert":
        model, make_inputs = _bert()
        return fused_norm.convert_model(fused_norm.fuse_add_norm(model)).eval(), make_inputs(0), 5
    model, make_inputs = _llama()
    return fused_norm.fuse_add_norm(model).eval(), make_inputs(0), 2


def _save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fused_add_norm_model_copies_pickles_and_saves(name):
    """A model converted by fuse_add_norm (its layers instances of classes made at run
    time) survives copy.deepcopy, pickle and torch.save/torch.load of the whole model: the
    copies have the same classes, run the fused ops as often and give the same outputs."""
    model, inputs, fused_calls = _fused_add_norm_model(name)
    with torch.no_grad(), count_fused_calls() as calls:
        expected = model(**inputs).logits
    assert calls.n == fused_calls
    for how, clone in (("deepcopy", copy.deepcopy), ("pickle", lambda m: pickle.loads(pickle.dumps(m))),
                       ("torch.save", _save_load)):
        other = clone(model)
        assert other is not model and [type(m) for m in other.modules()] == [type(m) for m in model.modules()], how
        with torch.no_grad(), count_fused_calls() as calls:
            got = other(**inputs).logits
        assert calls.n == fused_calls, how
        assert torch.equal(got, expected), how


def test_fused_add_norm_model_loads_in_a_new_process(tmp_path):
    """torch.load of a saved fuse_add_norm model in a process that never converted one
    (the fused classes are made on lookup) gives the same outputs."""
    model, inputs, fused_calls = _fused_add_norm_model("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    path = tmp_path / "model.pt"
    torch.save({"model": model, "inputs": inputs, "expected": expected}, path)
    script = (
        "import sys, torch, fused_norm\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "layers = saved['model'].model.layers\n"
        "assert all(type(m).__name__ == 'FusedAddNormLlamaDecoderLayer' for m in layers), [type(m) for m in layers]\n"
        "with torch.no_grad():\n"
        "    got = saved['model'](**saved['inputs']).logits\n"
        "assert torch.equal(got, saved['expected'])\n")
    root = Path(fused_norm.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _llama_layer_dtypes(model):
    """Records each decoder layer's output dtype (hooks on the layers only: the fused
    forward's choices depend on the MLP's hooks)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype)) for m in model.model.layers]
    return seen, hooks


def _llama_runs_match(model, converted, make_inputs, amp, fused_calls, exact):
    """Two training steps' logits, loss, layer output dtypes and parameter gradients of the
    model and its fuse_add_norm copy, under CPU autocast to bfloat16 when amp; the copy
    makes fused_calls op calls per step. exact: the same logits, loss and gradients as
    _assert_same demands; else within bfloat16 tolerance (the kernel's mean square sums
    in another order than torch's, a last-bit difference that bfloat16 rounding may
    turn into an ulp)."""
    for step in range(2):
        inputs = make_inputs(step)
        results = []
        for m in (model, converted):
            m.zero_grad()
            seen, hooks = _llama_layer_dtypes(m)
            with count_fused_calls() as calls:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = m(**inputs)
                out.loss.backward()
            for h in hooks:
                h.remove()
            results.append((out, seen, calls.n))
        (out_a, seen_a, n_a), (out_b, seen_b, n_b) = results
        assert n_a == 0 and n_b == fused_calls
        assert seen_a == seen_b
        if exact:
            _assert_same(out_a.logits, out_b.logits, "logits")
            _assert_same(out_a.loss, out_b.loss, "loss")
        else:
            scale = out_a.logits.detach().abs().max()
            _assert_same(out_a.logits / scale, out_b.logits / scale, "logits", rtol=2e-2, atol=2e-2)
            _assert_same(out_a.loss, out_b.loss, "loss", rtol=2e-2, atol=0)
        for (k, p), q in zip(model.named_parameters(), converted.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None and q.grad.dtype == p.grad.dtype, k
            if exact:
                _assert_same(p.grad, q.grad, f"grad {k}")
            else:
                err = (q.grad.float() - p.grad.float()).abs().max()
                assert err <= 5e-2 * p.grad.float().abs().max().clamp_min(1e-6), (k, err.item())


def _llama_with(model_dtype, norm_dtype):
    model, make_inputs = _llama()
    model.to(model_dtype)
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.to(norm_dtype)
    return model, make_inputs


class _record_add_rms_norm(TorchDispatchMode):
    """The dtypes of input, residual and weight (None: none) of each add_rms_norm_fwd call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fused_norm.add_rms_norm_fwd.default:
            self.calls.append(tuple(None if t is None else t.dtype for t in (args[0], args[1], args[3])))
        return func(*args, **(kwargs or {}))


BF16, F32 = torch.bfloat16, torch.float32
# (model dtype, RMSNorm weight dtype, CPU autocast to bfloat16, the op's input, residual and
# weight dtypes)
LLAMA_MIXED = {
    # autocast: the attention output in bfloat16, the residual stream in float32
    "fp32-amp": (F32, F32, True, (BF16, F32, F32)),
    # float32 norm weights of a bfloat16 model (it runs only under autocast: the norms'
    # float32 outputs meet bfloat16 Linears)
    "bf16+fp32norm-amp": (BF16, F32, True, (BF16, BF16, F32)),
    "bf16-amp": (BF16, BF16, True, (BF16, BF16, BF16)),
    # bfloat16 norm weights of a float32 model: the norms' outputs are float32
    "fp32+bf16norm": (F32, BF16, False, (F32, F32, None)),
}


@pytest.mark.parametrize("case", list(LLAMA_MIXED))
def test_llama_fused_add_norm_mixed_dtypes(case):
    """fuse_add_norm's Llama layers fuse where the dtypes differ too (float32 residual of
    bfloat16 attention outputs under autocast, float32 weights of a bfloat16 model, a
    bfloat16 weight of a float32 model) and match the unconverted model."""
    model_dtype, norm_dtype, amp, op_dtypes = LLAMA_MIXED[case]
    model, make_inputs = _llama_with(model_dtype, norm_dtype)
    converted = fused_norm.fuse_add_norm(copy.deepcopy(model))
    exact = not amp and model_dtype == torch.float32
    _llama_runs_match(model, converted, make_inputs, amp, fused_calls=2 * 2, exact=exact)
    with _record_add_rms_norm() as record, torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=amp):
        converted(**make_inputs(0))
    assert record.calls == [op_dtypes] * 2


def test_llama_fused_add_norm_autocast_with_hooked_mlp():
    """Under autocast, with a hook that sees the MLP's input, the norm's output keeps the
    unconverted model's dtype (float32): fused with the attention output cast to the
    residual's dtype."""
    model, make_inputs = _llama_with(torch.float32, torch.float32)
    converted = fused_norm.fuse_add_norm(copy.deepcopy(model))
    seen = []
    for m in (model, converted):
        for layer in m.model.layers:
            layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    _llama_runs_match(model, converted, make_inputs, True, fused_calls=2 * 2, exact=False)
    assert seen == [torch.float32] * len(seen) and len(seen) == 2 * 2 * 2
    with _record_add_rms_norm() as record, torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        converted(**make_inputs(0))
    assert record.calls == [(F32, F32, F32)] * 2


def test_llama_fused_add_norm_float64_runs_unfused():
    """LlamaRMSNorm normalizes a float64 sum in float32, which the op (in float64) does
    not: such layers run the unfused code, bit for bit the model's."""
    model, make_inputs = _llama_with(torch.float64, torch.float64)
    converted = fused_norm.fuse_add_norm(copy.deepcopy(model))
    inputs = make_inputs(0)
    with torch.no_grad(), count_fused_calls() as calls:
        got = converted(**inputs).logits
    assert calls.n == 0
    assert torch.equal(got, model(**inputs).logits)
