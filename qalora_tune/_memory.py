"""The process's memory: resident size now and at its peak, and lazily allocated zeros.

Peak memory on a CPU is the process's peak resident set (``VmHWM``), which counts the
pages of memory-mapped files it has touched as well as its own allocations: that is what
an out-of-memory killer sees and what the real-size benchmark bounds.
"""

import ctypes
import ctypes.util
import mmap
import resource
import sys
from typing import Callable, Dict, Optional

import torch

__all__ = [
    "format_memory",
    "lazy_zeros",
    "memory_stats",
    "peak_rss_bytes",
    "FreeMemoryReleaser",
    "release_free_memory",
    "reset_peak_rss",
    "rss_bytes",
]



def rss_bytes() -> int:
    """The process's resident memory now (``VmRSS``; 0 where ``/proc`` is absent)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (``VmHWM``, else ``ru_maxrss``)."""
    peak = _proc_status_bytes("VmHWM")
    if peak:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start :func:`peak_rss_bytes` again from the current RSS (Linux: ``5`` written to
    ``/proc/self/clear_refs``), so that a phase's own peak can be read at its end.

    Returns:
        bool: whether the peak could be reset (False elsewhere: the peak stays the
        process's since it started).
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Give the pages that glibc's ``malloc`` holds free back to the system
    (``malloc_trim(0)``).

    Streaming a checkpoint through quantization, or a model through the merge and export,
    frees many mid-sized CPU tensors while smaller long-lived ones are made between them.
    glibc keeps the freed memory in its heap, where the holes left between live blocks are
    never returned on their own: on Llama-2-7B this left 0.6 GB resident after the merged
    export (docs/results/real_size.md). Called between tensors and phases, this keeps the
    resident set at what is live. It costs a walk of the free lists (milliseconds).

    Returns:
        bool: whether anything could be released (False without glibc, and when nothing
        was free).
    """
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


class FreeMemoryReleaser:
    """Calls :func:`release_free_memory` once every ``every_bytes`` of tensors processed,
    for loops that stream a model tensor by tensor.

    Args:
        every_bytes (int): bytes of tensors between two releases.
    """

    def __init__(self, every_bytes: int = 256 << 20):
        self.every_bytes = every_bytes
        self._pending = 0

    def count(self, nbytes: int) -> None:
        """Record ``nbytes`` more processed (and freed); release when enough accumulated."""
        self._pending += nbytes
        if self._pending >= self.every_bytes:
            self._pending = 0
            release_free_memory()


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_stats(device: torch.device) -> Dict[str, float]:
    """Memory figures for a step's log, in GiB: the process's resident memory now and at
    its peak (every device: the host holds the data, and on CPU the model), and on CUDA
    the allocator's active, allocated and reserved peaks (torchtune's names)."""
    stats = {
        "rss_gib": rss_bytes() / 2**30,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
    }
    if device.type == "cuda":
        stats.update(
            peak_memory_active=torch.cuda.memory_stats(device).get("active_bytes.all.peak", 0) / 2**30,
            peak_memory_alloc=torch.cuda.max_memory_allocated(device) / 2**30,
            peak_memory_reserved=torch.cuda.max_memory_reserved(device) / 2**30,
        )
    return stats


def format_memory(stats: Dict[str, float]) -> str:
    """One log line of :func:`memory_stats`: RSS and its peak, and CUDA's peaks if any."""
    text = f"Memory: RSS {stats['rss_gib']:.2f} GiB (peak {stats['peak_rss_gib']:.2f} GiB)"
    if "peak_memory_alloc" in stats:
        text += (
            f"; CUDA peak allocated {stats['peak_memory_alloc']:.2f} GiB, reserved "
            f"{stats['peak_memory_reserved']:.2f} GiB"
        )
    return text


def lazy_zeros(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A zero tensor whose memory is only allocated where it is written.

    On the CPU it lives in an anonymous memory map: its pages read as zeros and become
    resident when first written, so a placeholder that a loaded tensor replaces costs no
    memory (a 152064 x 3584 bf16 embedding is 1.09 GB otherwise). Elsewhere it is
    ``torch.zeros``.

    Args:
        shape: the tensor's shape.
        dtype (torch.dtype): its dtype.
        device: defaults to the current default device.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if device.type != "cpu" or nbytes < mmap.PAGESIZE:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, nbytes)  # the tensor keeps the map alive
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
