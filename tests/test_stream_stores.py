"""CPU outputs of calls whose footprint exceeds the last-level cache are written with
non-temporal stores (csrc/cpu/vec_io.h, store_loop). That path must give exactly the
values, strides and memory format of the cached-store path, for every instruction set,
dtype and alignment of the rows (the elements before a row's first 64-byte boundary are
stored one by one, those after its last whole 64-byte line with cached stores). Short
rows and planes that are not whole lines are never streamed."""

import pytest
import torch
import torch.nn.functional as F

import fused_norm
from fused_norm import _C

from conftest import cpu_capabilities

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Rows and planes of at least 1024 values: outputs written in runs shorter than 2048 bytes
# that are not whole 64-byte lines are never streamed (vec_io.h, kStreamMinRunBytes).
CASES = [
    ("ln", (37, 1), None),  # never streamed
    ("ln", (33, 1029), None),  # rows start at every alignment
    ("ln", (5, 3000), None),  # longer than one block
    ("bn", (3, 5, 33, 33), None),  # NCHW planes of 1089 values
    ("bn", (2, 1030, 1, 3), torch.channels_last),
    ("bn", (2, 1030, 1, 1, 2), torch.channels_last_3d),
    ("bn", (5, 1030), None),
    ("bn", (4, 3, 1100), None),
    ("bn", (3, 5, 7, 7), None),  # never streamed
]


@pytest.fixture
def stream_threshold():
    """Sets the streaming threshold for the test (bytes), then restores the default."""
    yield _C.set_stream_threshold
    _C.set_stream_threshold(-1)


def _outputs(kind, x, w, b, dy):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    if kind == "ln":
        y = fused_norm.layer_norm(x, x.shape[-1:], w, b)
        return [y, *torch.autograd.grad(y, (x, w, b), dy)]
    rm, rv = torch.zeros_like(w), torch.ones_like(w)
    y = fused_norm.batch_norm(x, rm, rv, w, b, training=True)
    out = [y, *torch.autograd.grad(y, (x, w, b), dy), rm, rv]
    with torch.no_grad():
        out.append(fused_norm.batch_norm(x, rm, rv, w, b, training=False))
    y_eval = fused_norm.batch_norm(x, rm, rv, w, b, training=False)
    out.append(torch.autograd.grad(y_eval, x, dy)[0])
    return out


@pytest.mark.parametrize("cpu_capability", cpu_capabilities(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,shape,memory_format", CASES, ids=lambda v: str(v))
def test_streamed_outputs_equal_cached_ones(cpu_capability, dtype, kind, shape, memory_format, stream_threshold):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    c = shape[-1] if kind == "ln" else shape[1]
    wdtype = torch.float32 if kind == "bn" and dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.randn(c, generator=g, dtype=wdtype), torch.randn(c, generator=g, dtype=wdtype)
    dy = torch.randn(shape, generator=g, dtype=dtype)
    if memory_format is not None:
        dy = dy.contiguous(memory_format=memory_format)

    stream_threshold(1 << 62)  # never stream
    cached = _outputs(kind, x, w, b, dy)
    stream_threshold(0)  # always stream
    streamed = _outputs(kind, x, w, b, dy)
    for a, s in zip(cached, streamed):
        assert a.dtype == s.dtype and a.shape == s.shape and a.stride() == s.stride()
        assert torch.equal(a, s)


def test_default_threshold_streams_large_outputs():
    """With the default threshold (the last-level cache), an output larger than it is
    streamed and still matches torch."""
    threshold = _C.get_stream_threshold()
    assert threshold > 0
    if threshold > 1 << 30:
        pytest.skip(f"last-level cache of {threshold >> 20} MiB: too large an input for a quick test")
    cols = 4096
    rows = max(1, (threshold // (2 * 4 * cols)) + 1)  # x and y of float32: over the threshold
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused_norm.layer_norm(x, (cols,)), F.layer_norm(x, (cols,)))
