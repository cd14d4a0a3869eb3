"""safetensors files read and written one tensor at a time, without memory-mapping them.

``safetensors.safe_open`` maps the whole file: every tensor read stays resident in the
process (as file-backed pages counted in its RSS) until the handle closes, so streaming a
10 GB shard through it costs 10 GB of RSS. :class:`SafetensorsReader` reads each tensor
with ``pread`` into its own buffer instead, so memory holds only the tensors still in use.

:class:`ShardedSafetensorsWriter` writes a state dict that arrives one tensor (or one group
of tensors) at a time into shards of at most ``max_shard_size`` bytes, named and indexed as
Hugging Face names them (``model-00001-of-00003.safetensors`` with
``model.safetensors.index.json``; a single shard is ``model.safetensors`` without index).
A safetensors header precedes its data and lists every tensor's offsets, and Hugging Face
writes the whole model's ``__metadata__`` into every shard (transformers' torchao loader
reads it from there), so every header is written at the end, when the last tensor is known,
into room left before the shard's data (or, when it does not fit, in front of a copy made
inside the kernel). Memory holds one tensor at a time.

File layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON (``{name: {dtype, shape, data_offsets}, "__metadata__":
{str: str}}``, padded with spaces to a multiple of 8), then the tensors' bytes, contiguous,
in offset order.
"""

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from qalora_tune.checkpointing._atomic import atomic_write_text
from qalora_tune.errors import UserValueError

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "SAFETENSORS_INDEX_NAME",
    "SAFETENSORS_SINGLE_NAME",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "iter_safetensors",
    "parse_size",
    "safetensors_files",
    "shard_file_name",
    "tensor_bytes",
]

SAFETENSORS_SINGLE_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Hugging Face's default ("5GB")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_COPY_CHUNK = 64 << 20
# room kept for a shard's header (a 70B model's torchao metadata takes a few hundred KB),
# used in place when the padding left is at most 1/_MAX_PADDING_SHARE of the shard
_HEADER_RESERVE = 4 << 20
_MAX_PADDING_SHARE = 256
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's name of shard ``index`` (1-based) of ``count``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def parse_size(size: Union[int, str], setting: str = "max_shard_size") -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"`` or ``"2GiB"``.

    Raises:
        ValueError: naming ``setting`` for anything else, or a size that is not positive.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number):] or "B"
        try:
            value = int(float(number) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise UserValueError(
                f"{setting}={size!r} is not a size; use bytes or a string such as '5GB' or '500MB'"
            ) from None
    if value <= 0:
        raise UserValueError(f"{setting}={size!r} must be positive; set it to e.g. '5GB'")
    return value


def safetensors_files(directory: Union[str, Path]) -> List[Path]:
    """The weight files of a Hugging Face model directory, in index order: the shards named
    by ``model.safetensors.index.json`` when there is one, else ``model.safetensors``.

    Raises:
        FileNotFoundError: if neither exists, or the index names a missing shard.
    """
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [directory / name for name in names]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return paths
    single = directory / SAFETENSORS_SINGLE_NAME
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"neither {index} nor {single} found")


class SafetensorsReader:
    """One safetensors file, each tensor read on request with ``pread`` (no mapping).

    Args:
        path (str or Path): the file.

    Raises:
        ValueError: if the header is malformed or the file is shorter than its header says
            (a truncated download).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._header, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> Tuple[Dict[str, Any], int]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise ValueError("the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"the header claims {length} bytes but the file has {size - 8}")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        data_start = 8 + length
        end = max((info["data_offsets"][1] for name, info in header.items()
                   if name != "__metadata__"), default=0)
        if data_start + end > size:
            raise ValueError(
                f"the tensors need {data_start + end} bytes but the file has {size}"
            )
        return header, data_start

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def metadata(self) -> Dict[str, str]:
        """The header's ``__metadata__`` (``{}`` when absent)."""
        return dict(self._header.get("__metadata__") or {})

    def keys(self) -> List[str]:
        """Tensor names in file order (by offset)."""
        names = [n for n in self._header if n != "__metadata__"]
        return sorted(names, key=lambda n: self._header[n]["data_offsets"][0])

    def nbytes(self, name: str) -> int:
        begin, end = self._header[name]["data_offsets"]
        return end - begin

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into a new CPU tensor (owning its memory).

        Raises:
            KeyError: if the file has no such tensor.
            ValueError: for a dtype this reader does not know, or a short read.
        """
        info = self._header[name]
        try:
            dtype = _DTYPES[info["dtype"]]
        except KeyError:
            raise ValueError(f"{self.path}: {name} has dtype {info['dtype']}, not supported") from None
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy()) if end > begin else memoryview(b"")
        offset, done = self._data_start + begin, 0
        while done < end - begin:
            read = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if read <= 0:
                raise ValueError(f"{self.path}: short read of {name} (the file changed?)")
            done += read
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        return buffer.view(dtype).reshape(shape)


class ShardedSafetensorsWriter:
    """Write tensors as they arrive into Hugging Face-style shards (see the module notes).

    Call :meth:`add` once per tensor (or per group of tensors that must share a shard,
    e.g. the flattened parts of one quantized weight), then :meth:`close`. Nothing is
    under a final file name until :meth:`close` returns; write into a staging directory
    (:func:`~qalora_tune.checkpointing.atomic_directory`) to publish the set atomically.

    Each shard's data goes to a partial file after ``header_reserve`` bytes left for the
    header. At :meth:`close`, a large shard whose header fits there gets it written in
    place, padded with spaces as the format allows, and is renamed: its data is written
    once. Otherwise (a header larger than the reserve, or a small shard, where the padding
    would show) the shard is copied behind its exact header, inside the kernel.

    Args:
        directory (str or Path): an existing directory.
        max_shard_size (int or str): bytes of tensor data per shard at most (a single
            tensor larger than that gets a shard of its own); e.g. ``"5GB"``.
        metadata (Mapping[str, str], optional): ``__metadata__`` entries written in every
            shard (e.g. ``{"format": "pt"}``); :meth:`add` can add more.
        header_reserve (int): bytes kept for each header.

    Raises:
        ValueError: if ``max_shard_size`` is not a positive size.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
        metadata: Optional[Mapping[str, str]] = None,
        header_reserve: int = _HEADER_RESERVE,
    ):
        self.directory = Path(directory)
        self.max_shard_size = parse_size(max_shard_size)
        self._metadata: Dict[str, str] = dict(metadata or {})
        self._reserve = header_reserve + (-header_reserve % 8)
        self._shards: List[Dict[str, Any]] = []  # partial file, entries, bytes
        self._file = None
        self._names = set()
        self._closed = False

    @property
    def total_size(self) -> int:
        """Bytes of tensor data added so far."""
        return sum(shard["bytes"] for shard in self._shards)

    def add(self, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
        """Append ``tensors`` (written to disk now) to the current shard, or to a new one
        when they would make it exceed ``max_shard_size``.

        Args:
            tensors (Mapping[str, torch.Tensor]): names and tensors, kept in one shard.
            metadata (Mapping[str, str], optional): ``__metadata__`` entries to add.

        Raises:
            ValueError: for a name already written, or a dtype safetensors has no name for.
        """
        if self._closed:
            raise ValueError("the writer is closed")
        size = 0
        for name, tensor in tensors.items():
            if name in self._names or name == "__metadata__":
                raise ValueError(f"tensor {name!r} is written twice")
            if tensor.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
            size += tensor_bytes(tensor)
        current = self._shards[-1] if self._shards else None
        if current is None or (current["bytes"] and current["bytes"] + size > self.max_shard_size):
            current = self._open_shard()
        for name, tensor in tensors.items():
            data = tensor.detach().to("cpu").contiguous()
            nbytes = tensor_bytes(data)
            if nbytes:
                self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            begin = current["bytes"]
            current["entries"][name] = {
                "dtype": _DTYPE_NAMES[data.dtype],
                "shape": list(data.shape),
                "data_offsets": [begin, begin + nbytes],
            }
            current["bytes"] += nbytes
            self._names.add(name)
        self._metadata.update(metadata or {})

    def start_shard(self) -> None:
        """End the current shard: the next :meth:`add` starts a new one (when the current
        one holds anything)."""
        if self._shards and self._shards[-1]["bytes"]:
            self._open_shard()

    def _open_shard(self) -> Dict[str, Any]:
        if self._file is not None:
            self._file.close()
        partial = self.directory / f".shard-{len(self._shards) + 1:05d}.partial"
        self._file = open(partial, "wb")
        self._file.seek(self._reserve)
        shard = {"partial": partial, "entries": {}, "bytes": 0}
        self._shards.append(shard)
        return shard

    def close(
        self,
        progress: Optional[Callable[[int], None]] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> List[Path]:
        """Write the headers, name the shard files (and write the index when there are
        several).

        Args:
            progress (Callable[[int], None], optional): called with the bytes of each
                shard finished.
            metadata (Mapping[str, str], optional): last ``__metadata__`` entries (e.g. a
                list of every tensor), written in every shard.

        Returns:
            List[Path]: the shard files, in order.
        """
        if self._closed:
            raise ValueError("the writer is already closed")
        self._metadata.update(metadata or {})
        if not self._shards:  # nothing added: one empty file
            self._open_shard()
        self._file.close()
        self._closed = True
        count = len(self._shards)
        paths, weight_map = [], {}
        for index, shard in enumerate(self._shards, start=1):
            name = SAFETENSORS_SINGLE_NAME if count == 1 else shard_file_name(index, count)
            path = self.directory / name
            self._finish(path, shard)
            if progress is not None:
                progress(shard["bytes"])
            paths.append(path)
            weight_map.update({tensor: name for tensor in shard["entries"]})
        if count > 1:
            index_json = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            atomic_write_text(self.directory / SAFETENSORS_INDEX_NAME, json.dumps(index_json, indent=2))
        return paths

    def _finish(self, path: Path, shard: Dict[str, Any]) -> None:
        header = dict(shard["entries"])
        if self._metadata:
            header["__metadata__"] = self._metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        room = self._reserve - 8
        if len(encoded) <= room and room - len(encoded) <= shard["bytes"] // _MAX_PADDING_SHARE:
            with open(shard["partial"], "r+b") as out:
                out.write(struct.pack("<Q", room) + encoded + b" " * (room - len(encoded)))
            os.replace(shard["partial"], path)
            return
        with open(path, "wb") as out, open(shard["partial"], "rb") as partial:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            _copy(partial, self._reserve, out, shard["bytes"])
        os.unlink(shard["partial"])


def _copy(source, offset: int, destination, count: int) -> None:
    """``count`` bytes of ``source`` from ``offset`` on to ``destination``'s position,
    inside the kernel where it can (``copy_file_range``), else through a bounded buffer."""
    destination.flush()
    src, dst = source.fileno(), destination.fileno()
    done, in_kernel = 0, hasattr(os, "copy_file_range")
    while done < count:
        step = min(count - done, _COPY_CHUNK)
        copied = 0
        if in_kernel:
            try:
                copied = os.copy_file_range(src, dst, step, offset + done)
            except OSError:  # another filesystem or an old kernel
                in_kernel = False
        if not in_kernel:
            copied = os.write(dst, os.pread(src, step, offset + done))
        if copied <= 0:
            raise OSError(f"could not copy into {destination.name}: {count - done} bytes left")
        done += copied


def iter_safetensors(path: Union[str, Path]) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of one file in offset order, each read when asked for."""
    with SafetensorsReader(path) as reader:
        for name in reader.keys():
            yield name, reader.get_tensor(name)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a dense tensor's data."""
    return tensor.numel() * tensor.element_size()
