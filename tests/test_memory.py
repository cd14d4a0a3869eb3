"""The process's memory figures, their reset, and lazily allocated zeros."""

import sys

import pytest
import torch

from qalora_tune._memory import lazy_zeros, peak_rss_bytes, reset_peak_rss, rss_bytes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


@linux_only
def test_lazy_zeros_take_memory_only_where_written():
    size = 256 << 20
    before = rss_bytes()
    zeros = lazy_zeros((size // 2,), torch.bfloat16, "cpu")
    assert zeros.shape == (size // 2,) and zeros.dtype == torch.bfloat16
    assert rss_bytes() - before < 0.1 * size  # nothing resident yet
    zeros[: size // 8] = 1.0  # a quarter of the bytes written
    grown = rss_bytes() - before
    assert 0.2 * size < grown < 0.45 * size
    assert float(zeros.sum()) == size // 8  # the rest reads as zeros


@linux_only
def test_the_peak_follows_an_allocation_and_restarts_when_reset():
    block = torch.ones(128 << 20, dtype=torch.uint8)  # 128 MiB, touched
    high = peak_rss_bytes()
    assert high >= rss_bytes() >= block.numel()
    del block
    if not reset_peak_rss():
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    assert peak_rss_bytes() < high - (64 << 20)
