"""The process's memory figures and ``page_out`` (file pages handed back, data intact)."""

import sys

import numpy as np
import pytest
import torch

from qalora_tune._memory import page_out, peak_rss_bytes, rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")
def test_page_out_gives_back_touched_file_pages_and_keeps_the_data(tmp_path):
    path = tmp_path / "weights.bin"
    size = 96 << 20
    values = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    values.tofile(path)
    checksum = int(values.sum())
    del values
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r"))
    before = rss_bytes()
    assert int(mapped.sum()) == checksum  # touches every page of the mapping
    touched = rss_bytes()
    assert touched - before > 0.8 * size
    assert page_out(mapped)
    assert touched - rss_bytes() > 0.8 * size  # handed back
    assert int(mapped.sum()) == checksum  # and read again from the file when used
    assert peak_rss_bytes() >= touched


def test_page_out_of_anonymous_memory_keeps_it():
    block = torch.arange(1 << 20, dtype=torch.int32)
    page_out(block)  # without swap nothing moves; with swap it comes back on use
    assert torch.equal(block, torch.arange(1 << 20, dtype=torch.int32))
    assert not page_out(block[::2])  # not contiguous: nothing to advise
