"""Hugging Face decoder models, unchanged, with their own RMSNorm classes (Llama, Qwen3,
Mistral: LlamaRMSNorm and its copies; Gemma, Gemma3: x_hat * (1 + w) in float32), built
from tiny configs with random weights (nothing is downloaded), converted with
fused_norm.convert_model and compared with the unconverted model in float32 and
bfloat16: 3 SGD steps in training mode and one in eval (logits, loss, every parameter
gradient), and torch._dynamo.explain's graph breaks."""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import fused_norm  # noqa: E402
from conftest import count_fused_calls  # noqa: E402

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, max_position_embeddings=64)

CONFIGS = {
    "llama": (lambda: transformers.LlamaConfig(**_COMMON), transformers.LlamaForCausalLM, "llama"),
    "qwen3": (lambda: transformers.Qwen3Config(**_COMMON), transformers.Qwen3ForCausalLM, "llama"),
    "mistral": (lambda: transformers.MistralConfig(**_COMMON), transformers.MistralForCausalLM, "llama"),
    "gemma": (lambda: transformers.GemmaConfig(**_COMMON), transformers.GemmaForCausalLM, "gemma"),
    "gemma3": (lambda: transformers.Gemma3TextConfig(**_COMMON, sliding_window=8), transformers.Gemma3ForCausalLM,
               "gemma"),
}
# Per dtype: logits and loss, gradients (relative to each gradient's largest value: the
# kernel's mean square sums in another order than torch's, a last-bit difference that
# bfloat16 rounding occasionally turns into an ulp).
TOLS = {torch.float32: (dict(atol=1e-5, rtol=1e-4), 1e-4), torch.bfloat16: (dict(atol=3e-2, rtol=3e-2), 5e-2)}


def _model(name, dtype):
    make_config, cls, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = cls(make_config()).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms start at 1 (Llama) or 0 (Gemma): make the weights matter
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.add_((torch.rand(m.weight.shape, generator=g) * 0.4 - 0.2).to(dtype))
    return model


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return dict(input_ids=ids, labels=ids)


def _convert(model, mode):
    converted = fused_norm.convert_model(copy.deepcopy(model))
    norms = [m for m in converted.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(type(m).__name__.startswith("Fused") and type(m)._fused_norm_mode == mode for m in norms)
    return converted


def _assert_grads_close(model, converted, rel):
    for (k, p), q in zip(model.named_parameters(), converted.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None and q.grad.dtype == p.grad.dtype, k
        scale = p.grad.float().abs().max().clamp_min(1e-6)
        err = (q.grad.float() - p.grad.float()).abs().max()
        assert err <= rel * scale, (k, err.item(), scale.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_and_eval_match_unconverted(name, dtype):
    model = _model(name, dtype)
    converted = _convert(model, CONFIGS[name][2])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, converted)]
    tol, rel = TOLS[dtype]
    for training, steps in ((True, 3), (False, 1)):
        for step in range(steps):
            inputs = _inputs(10 * step + training)
            outs = []
            for m, opt in zip((model, converted), optimizers):
                m.train(training)
                opt.zero_grad()
                with count_fused_calls() as count:
                    out = m(**inputs)
                    out.loss.backward()
                assert count.n > 0 if m is converted else count.n == 0
                outs.append(out)
            assert outs[1].logits.dtype == outs[0].logits.dtype
            torch.testing.assert_close(outs[1].logits, outs[0].logits, **tol)
            torch.testing.assert_close(outs[1].loss, outs[0].loss, **tol)
            _assert_grads_close(model, converted, rel)
            if training:
                for opt in optimizers:
                    opt.step()
                # the parameters moved alike: keep both models on the same weights
                with torch.no_grad():
                    for p, q in zip(model.parameters(), converted.parameters()):
                        q.copy_(p)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_no_more_graph_breaks(name):
    model = _model(name, torch.float32)
    converted = _convert(model, CONFIGS[name][2])
    counts = []
    for m in (model, converted):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m)(**_inputs(0))
        counts.append(explained.graph_break_count)
        code = "\n".join(g.code for g in explained.graphs)
        assert ("torch.ops.fused_norm.rms_norm_fwd" in code) == (m is converted)
    torch._dynamo.reset()
    assert counts[1] <= counts[0]


class _ScaledRMSNorm(nn.Module):
    """Shaped like an RMSNorm, but computes something else: x_hat * w * 2."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (2 * self.weight * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class _OtherRMSNorm(_ScaledRMSNorm):
    """Llama's formula with the root mean square computed as a division: not bit-exact."""

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class _LlamaCopyRMSNorm(_ScaledRMSNorm):
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


def test_unknown_rmsnorm_left_alone_with_a_warning():
    model = nn.Sequential(_ScaledRMSNorm(8), _OtherRMSNorm(8), _LlamaCopyRMSNorm(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_norm.convert_model(model)
    messages = [str(w.message) for w in caught]
    assert any("_ScaledRMSNorm" in m for m in messages) and any("_OtherRMSNorm" in m for m in messages)
    assert type(model[0]) is _ScaledRMSNorm and type(model[1]) is _OtherRMSNorm
    assert type(model[2]).__name__ == "Fused_LlamaCopyRMSNorm" and isinstance(model[2], _LlamaCopyRMSNorm)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    model[2].to(torch.bfloat16)
    torch.testing.assert_close(model[2](x), _LlamaCopyRMSNorm.forward(model[2], x), atol=1e-2, rtol=1e-2)
