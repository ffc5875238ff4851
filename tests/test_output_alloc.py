"""Large CPU outputs come from fused_norm's reused huge-page mappings (csrc/bindings/
output_alloc.cpp). They must behave as any torch tensor: values, resize, serialization."""

import io

import torch
import torch.nn.functional as F

import fused_norm

HUGE_PAGE = 2 << 20
ROWS, COLS = 1024, 1024  # 4 MiB of float32: the smallest size that takes the mapping path


def _x():
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))


def test_large_output_is_aligned_and_correct():
    x = _x()
    y = fused_norm.layer_norm(x, (COLS,))
    assert y.data_ptr() % HUGE_PAGE == 0
    torch.testing.assert_close(y, F.layer_norm(x, (COLS,)))


def test_freed_mapping_is_reused():
    x = _x()
    y = fused_norm.layer_norm(x, (COLS,))
    ptr = y.data_ptr()
    del y
    y = fused_norm.layer_norm(x, (COLS,))
    assert y.data_ptr() == ptr
    torch.testing.assert_close(y, F.layer_norm(x, (COLS,)))


def test_resize_and_serialize():
    x = _x()
    y = fused_norm.layer_norm(x, (COLS,))
    expected = y.clone()
    assert y.untyped_storage().resizable()
    y.resize_(2 * ROWS, COLS)  # grows through the same allocator, keeping the data
    torch.testing.assert_close(y[:ROWS], expected)
    buf = io.BytesIO()
    torch.save(y[:ROWS], buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf), expected)


def test_batch_norm_channels_last_output():
    x = torch.randn(8, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 8 MiB
    rm, rv = torch.zeros(64), torch.ones(64)
    y = fused_norm.batch_norm(x, rm.clone(), rv.clone(), training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.data_ptr() % HUGE_PAGE == 0
    torch.testing.assert_close(y, F.batch_norm(x, rm.clone(), rv.clone(), training=True))
