"""The process's memory: resident size now and at its peak, and lazily allocated zeros.

Peak memory on a CPU is the process's peak resident set (``VmHWM``), which counts the
pages of memory-mapped files it has touched as well as its own allocations: that is what
an out-of-memory killer sees and what the real-size benchmark bounds.
"""

import mmap
import resource
import sys
from typing import Dict

import torch

__all__ = [
    "format_memory",
    "lazy_zeros",
    "memory_stats",
    "peak_rss_bytes",
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
