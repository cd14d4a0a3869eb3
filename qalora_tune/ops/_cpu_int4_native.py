"""GEMMs against a CPU-packed int4 weight that dequantize inside the GEMM (a C++ kernel).

The chunked paths (``_cpu_int4_chunked``) rebuild the weight into a dense buffer and hand
it to BLAS, which then copies it again into its own packed panels: two passes over the
weight on top of the GEMM. The kernel in ``_cpu_int4_gemm.cpp`` writes the dequantized
weight straight into the GEMM's packed panel (a few dozen KiB, in L1/L2) and multiplies
it there with AVX-512 micro-kernels (``vdpbf16ps`` in bf16, ``vfmadd231ps`` in fp32).
The weight's values are the same as :func:`~qalora_tune.quantization.dequantize_packed`'s,
bit for bit; products accumulate in fp32 and are rounded once to the compute dtype.

    forward:         y = x @ W^T       (M, K) x (K, N)
    input gradient:  grad @ W, computed as (W^T @ grad^T)^T, so that the dequantized rows
                     of W^T are the operand read as 32-bit pairs

The library is compiled on first use with the system C++ compiler (``$CXX`` or ``c++``)
into ``$QALORA_TUNE_CACHE_DIR``, or else the user's cache (``~/.cache/qalora_tune``) or a
per-user directory in the system temp dir, never into the installed package; its file
name is a hash of the source, flags, compiler version and the CPU's ISA flags, and it is
written under a private name and renamed, so processes building at once each load a
complete file. It is loaded with ``ctypes``; its OpenMP is the ``libgomp`` torch already
loaded, so it shares torch's threads (``torch.get_num_threads()``). It needs Linux, a CPU
with AVX-512 F/BW/VL and AVX512-BF16, and the 64-row AVX-512 packing of
``cpu_int4_layout``. Elsewhere the chunked paths run without trying a build; if the build
fails (no compiler, no writable cache) they run after one logged warning line;
``QALORA_TUNE_NATIVE_INT4=0`` selects them from the start.
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from qalora_tune.quantization.cpu_int4_layout import CpuInt4Layout, cpu_int4_layout

__all__ = ["available", "grad_input", "linear", "supports"]

_SOURCE = Path(__file__).with_name("_cpu_int4_gemm.cpp")
_ENV = "QALORA_TUNE_NATIVE_INT4"
_CACHE_ENV = "QALORA_TUNE_CACHE_DIR"
_FLAGS = (
    "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off",
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma",
)
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
_LAYOUT = CpuInt4Layout(64, 4)
BLOCK_N = 64  # rows of W per packed block; the kernel takes weights of whole blocks
_DTYPES = (torch.bfloat16, torch.float32)

_log = logging.getLogger(__name__)
_library: Optional[ctypes.CDLL] = None
_failed = False


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dirs() -> List[Path]:
    """Where the library may be built, in order: ``$QALORA_TUNE_CACHE_DIR`` alone if set,
    else the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``) and a per-user directory
    in the system temp dir (for a read-only home)."""
    configured = os.environ.get(_CACHE_ENV)
    if configured:
        return [Path(configured)]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qalora_tune"
    return [user, Path(tempfile.gettempdir()) / f"qalora_tune-{os.getuid()}"]


def _usable(directory: Path) -> bool:
    """Creates ``directory`` if needed; whether this user owns it and may write to it."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return directory.stat().st_uid == os.getuid() and os.access(directory, os.W_OK | os.X_OK)
    except OSError:
        return False


def _build_key(compiler_version: str) -> str:
    """Hash of what the library depends on: source, flags, compiler and the CPU's ISA."""
    cpu = " ".join(sorted(set(_CPU_FLAGS) & _cpu_flags())) + platform.machine()
    material = [_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler_version.encode(), cpu.encode()]
    return hashlib.sha256(b"\0".join(material)).hexdigest()[:16]


def _build(compiler: str) -> Path:
    """The compiled library, built into the first usable cache directory unless an
    identical build is already in one.

    Raises:
        OSError: the compiler is missing, or no cache directory is writable.
        RuntimeError: the compiler failed (its first line of errors).
        subprocess.SubprocessError: the compiler timed out or failed ``--version``.
    """
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    name = f"qalora_int4_gemm_{_build_key(version)}.so"
    directories = _cache_dirs()
    for directory in directories:
        if (directory / name).is_file():
            return directory / name
    for directory in directories:
        if not _usable(directory):
            continue
        target = directory / name
        # built under a private name and renamed: processes building at once never see a
        # half-written file, and the last rename leaves one complete library
        handle, partial = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
        os.close(handle)
        try:
            done = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", partial],
                capture_output=True, text=True, timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError((done.stderr.strip().splitlines() or ["compiler failed"])[0])
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return target
    raise PermissionError(f"no writable cache directory among {[str(d) for d in directories]}")


def _declare(library: ctypes.CDLL) -> None:
    pointer, size, threads = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    linear_args = [pointer, size, size, size, pointer, pointer, size, size, pointer, size, size, threads]
    grad_args = [pointer, size, pointer, pointer, size, size, size, pointer, threads]
    for dtype in ("bf16", "fp32"):
        getattr(library, f"qalora_int4_linear_{dtype}").argtypes = linear_args
        getattr(library, f"qalora_int4_grad_input_{dtype}").argtypes = grad_args


def _load() -> Optional[ctypes.CDLL]:
    global _library, _failed
    if _library is not None or _failed:
        return _library
    try:
        library = ctypes.CDLL(str(_build(os.environ.get("CXX", "c++"))))
        _declare(library)
    except Exception as error:  # no compiler, a failed build: the chunked paths, once
        _failed = True
        first_line = (str(error).splitlines() or [""])[0]
        _log.warning(
            "qalora-tune could not build its CPU int4 GEMM kernel (%s: %s); using the "
            "slower chunked path. Set %s=0 to skip this attempt.",
            type(error).__name__, first_line, _ENV,
        )
        return None
    _library = library
    return library


_MACHINE_OK = (
    sys.platform.startswith("linux")
    and cpu_int4_layout() == _LAYOUT
    and set(_CPU_FLAGS) <= _cpu_flags()
)


def available() -> bool:
    """Whether the kernel can run here (machine, layout, switch, and a successful build)."""
    if os.environ.get(_ENV, "1") in ("0", "") or not _MACHINE_OK:
        return False
    return _load() is not None


def supports(qdata: torch.Tensor, scale_and_zero: torch.Tensor) -> bool:
    """Whether the kernel takes this CPU-packed weight: bf16 or fp32 scales, whole
    64-row blocks, contiguous storage, and a built library."""
    return (
        qdata.dim() == 2
        and qdata.device.type == "cpu"
        and scale_and_zero.dtype in _DTYPES
        and qdata.shape[0] % BLOCK_N == 0
        and qdata.is_contiguous()
        and scale_and_zero.is_contiguous()
        and available()
    )


def linear(
    x2d: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """``x @ W^T`` in ``scale_and_zero.dtype`` (a weight :func:`supports` accepts).

    Args:
        x2d (torch.Tensor): ``(M, K)``, contiguous, in ``scale_and_zero.dtype``.
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        out_features (int): ``N``; rows beyond it are padding.

    Returns:
        torch.Tensor: ``(M, out_features)``, contiguous.
    """
    library = _load()
    rows, in_features = x2d.shape
    out = x2d.new_empty(rows, out_features)
    if rows == 0:
        return out
    kernel = library.qalora_int4_linear_bf16 if x2d.dtype == torch.bfloat16 else library.qalora_int4_linear_fp32
    kernel(
        x2d.data_ptr(), rows, in_features, x2d.stride(0), qdata.data_ptr(),
        scale_and_zero.data_ptr(), qdata.shape[0], group_size, out.data_ptr(),
        out_features, out_features, torch.get_num_threads(),
    )
    return out


def grad_input(
    grad2d: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``grad @ W`` in ``grad2d.dtype`` (a weight :func:`supports` accepts).

    Args:
        grad2d (torch.Tensor): ``(M, N)`` in ``scale_and_zero.dtype``.
        qdata (torch.Tensor): ``(N_pad, K / 2)`` uint8 in the CPU kernel's layout.
        scale_and_zero (torch.Tensor): ``(n_groups_pad, N_pad, 2)``.
        group_size (int): quantization group size.
        in_features (int): ``K``.

    Returns:
        torch.Tensor: ``(M, in_features)``, contiguous; products accumulate in fp32 and
        are rounded once.
    """
    library = _load()
    rows, out_features = grad2d.shape
    if rows == 0:
        return grad2d.new_empty(0, in_features)
    n_pad = qdata.shape[0]
    lanes = -(-rows // 16) * 16  # the kernel's lane vectors hold 16 rows of grad
    # grad^T with zero rows for W's padding and zero lanes past M: (N_pad, lanes), in bf16
    # as 32-bit pairs of consecutive n, the operand layout of vdpbf16ps
    padded = F.pad(grad2d, (0, n_pad - out_features, 0, lanes - rows))
    if grad2d.dtype == torch.bfloat16:
        padded = padded.view(torch.int32)
        kernel = library.qalora_int4_grad_input_bf16
    else:
        kernel = library.qalora_int4_grad_input_fp32
    grad_t = padded.t().contiguous()
    out_t = torch.empty(in_features, lanes, dtype=torch.float32)
    kernel(
        grad_t.data_ptr(), lanes, qdata.data_ptr(), scale_and_zero.data_ptr(), n_pad,
        in_features, group_size, out_t.data_ptr(), torch.get_num_threads(),
    )
    out = grad2d.new_empty(rows, in_features)
    out.copy_(out_t[:, :rows].t())
    return out


def _reset(failed: Optional[bool] = None) -> None:
    """Forget the loaded library (and set the failure flag); for tests."""
    global _library, _failed
    _library = None
    if failed is not None:
        _failed = failed
