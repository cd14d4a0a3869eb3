"""The process's memory figures, their reset, and lazily allocated zeros."""

import subprocess
import sys

import pytest
import torch

from qalora_tune import _memory
from qalora_tune._memory import (
    FreeMemoryReleaser,
    lazy_zeros,
    peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
)

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


_HEAP_HOLES_SCRIPT = """
import torch
from qalora_tune._memory import release_free_memory, rss_bytes
big, small = [], []
for _ in range(3000):  # 64 KiB each: below glibc's mmap threshold, so from its heap
    big.append(torch.ones(16384))
    small.append(torch.ones(256))  # pins the heap between the big ones
before_free = rss_bytes()
del big
held = rss_bytes()
released = release_free_memory()
print(before_free, held, int(released), rss_bytes(), float(small[-1].sum()))
"""


@pytest.mark.skipif(_memory._MALLOC_TRIM is None, reason="needs glibc's malloc_trim (Linux)")
def test_released_memory_leaves_the_resident_set():
    """Freed tensors in holes between live ones stay resident until released: the pattern
    of a checkpoint streamed through quantization (a big temporary, a small result, ...).

    Runs in a fresh interpreter: in a process that has already freed memory (the rest of
    the suite), the small tensors reuse old free chunks, the big ones end up side by side
    and glibc returns them on its own, so the holes this test needs do not form.
    """
    result = subprocess.run([sys.executable, "-c", _HEAP_HOLES_SCRIPT], capture_output=True,
                            text=True, check=True, timeout=300)
    before_free, held, released, after, small_sum = result.stdout.split()
    before_free, held, after = int(before_free), int(held), int(after)
    assert held > before_free - 50 * 2**20  # freed, but still resident (holes in the heap)
    assert released == "1"
    assert after < held - 100 * 2**20  # of 187 MiB freed
    assert float(small_sum) == 256  # the live tensors are untouched


def test_the_releaser_releases_once_per_interval(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "release_free_memory", lambda: calls.append(1) or True)
    releaser = FreeMemoryReleaser(every_bytes=100)
    for nbytes in (40, 40, 40, 10, 90, 250):
        releaser.count(nbytes)
    assert len(calls) == 3  # at 120, at 100 (10 + 90), at 250


def test_release_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(_memory, "_MALLOC_TRIM", None)
    assert release_free_memory() is False
