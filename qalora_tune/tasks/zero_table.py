"""Task packages: a merged QA-LoRA task as a table of zero points, and nothing else.

QA-LoRA's merge changes only the zero points of the int4 base (``z' = z + (alpha/r)(B A)/G``),
so every task merged into one base shares its codes and scales. A task package holds
what differs:

    {task_dir}/task.json                 format, task name, the base's fingerprint and config
                                         essentials, group size, bits, dtype, layer shapes, sizes
    {task_dir}/zero_points.safetensors   per quantized linear (Hugging Face weight name), the
                                         task's zero points, (out_features, n_groups), rows in
                                         Hugging Face order, as the base's storage keeps them
    {task_dir}/.qalora-tune-output       marks the directory as qalora-tune's (may be replaced)

It is data only: JSON parsed and checked, safetensors read as tensors; nothing in it is
imported or called. The zeros are kept exactly as the base's files keep them, in their
dtype (``task.json``'s ``base.storage``): ``z`` of ``W = (q - 2**(bits-1)) s + z`` for the
int4 formats (bf16 in ``int4_tile_packed``: 16/G bits per weight), torchao's
``zp = -z / s`` of ``W = (q - 2**(bits-1) - zp) s`` for ``intx`` (fp32: 32/G bits per
weight); a switch converts them to the loaded model's storage as loading a file does
(:mod:`qalora_tune.tasks.switch`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qalora_tune._files import is_regular_file_inside, read_json
from qalora_tune.checkpointing import OUTPUT_MARKER_NAME, HFKeyMap, atomic_directory
from qalora_tune._version import __version__
from qalora_tune.errors import UserFileNotFoundError, UserValueError
from qalora_tune.quantization import SUPPORTED_BITS
from qalora_tune.tasks.base_layers import (
    BaseLayer,
    base_fingerprint,
    fingerprint_layers,
    layer_digest,
    model_base_layers,
    read_merged_base,
)

__all__ = [
    "ESSENTIAL_CONFIG_KEYS",
    "TASK_FORMAT",
    "TASK_METADATA_NAME",
    "TASK_ZEROS_NAME",
    "TaskPackage",
    "export_task",
    "export_task_from_merged",
    "read_task_package",
    "write_task_package",
]

TASK_FORMAT = "qalora-tune zero-point table"
TASK_FORMAT_VERSION = 1
TASK_METADATA_NAME = "task.json"
TASK_ZEROS_NAME = "zero_points.safetensors"
MARKER_KIND = "task_zero_table"
# the config.json entries that say which model a table is for (those the base has)
ESSENTIAL_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)
_ZERO_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
_STORAGES = ("int4", "intx")
_MAX_NAME = 200
CONVENTIONS = {
    "int4": "W[n, k] = (q[n, k] - 2**(bits-1)) * scale[n, g] + zero[n, g], g = k // group_size; "
    "rows in Hugging Face order",
    "intx": "W[n, k] = (q[n, k] - 2**(bits-1) - zero[n, g]) * scale[n, g], g = k // group_size "
    "(torchao IntxUnpackedToInt8Tensor's zero_point); rows in Hugging Face order",
}


@dataclass(frozen=True)
class TaskPackage:
    """A task package read and checked, ready to apply.

    Attributes:
        path (Path): its directory.
        metadata (Dict[str, Any]): ``task.json``.
        zeros (Dict[str, torch.Tensor]): Hugging Face weight name -> ``(out_features,
            n_groups)`` zero points.
    """

    path: Path
    metadata: Dict[str, Any]
    zeros: Dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        """The task's name."""
        return self.metadata["name"]

    @property
    def base(self) -> Dict[str, Any]:
        """What the table was made for: fingerprint, group size, bits, dtypes, config."""
        return self.metadata["base"]

    @property
    def nbytes(self) -> int:
        """Bytes of zero points."""
        return sum(t.numel() * t.element_size() for t in self.zeros.values())


def essential_config(hf_config: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of a ``config.json`` that say which model it describes."""
    return {k: hf_config[k] for k in ESSENTIAL_CONFIG_KEYS if k in hf_config}


def _collect(layers: Iterable[BaseLayer]) -> Dict[str, Any]:
    """Zero points, digests and the shared settings of a base given layer by layer."""
    zeros, digests, shapes = {}, {}, {}
    group_sizes, bits, scale_dtypes, storages, parameters = set(), set(), set(), set(), 0
    for layer in layers:
        if layer.key in zeros:
            raise UserValueError(f"{layer.key} occurs twice in the model")
        digests[layer.key] = layer_digest(layer)
        zeros[layer.key] = layer.zero.detach().to("cpu").contiguous()
        shapes[layer.key] = {
            "shape": list(layer.codes.shape), "zero_shape": list(layer.zero_shape)
        }
        group_sizes.add(layer.group_size)
        bits.add(layer.bits)
        scale_dtypes.add(str(layer.scale.dtype).removeprefix("torch."))
        storages.add(layer.storage)
        parameters += layer.codes.numel()
    fingerprint = base_fingerprint(digests)  # refuses a model without quantized linears
    for what, values in (("group sizes", group_sizes), ("bit widths", bits),
                         ("scale dtypes", scale_dtypes), ("storages", storages)):
        if len(values) != 1:
            raise UserValueError(
                f"the base mixes {what} ({', '.join(map(str, sorted(values)))}); a task "
                "package describes one base quantization"
            )
    return {
        "zeros": zeros,
        "fingerprint": fingerprint,
        "layers": shapes,
        "group_size": group_sizes.pop(),
        "bits": bits.pop(),
        "scale_dtype": scale_dtypes.pop(),
        "storage": storages.pop(),
        "quantized_parameters": parameters,
    }


def write_task_package(
    directory: Union[str, Path],
    layers: Iterable[BaseLayer],
    hf_config: Mapping[str, Any],
    name: Optional[str] = None,
    source: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    base: Optional[Tuple[str, str]] = None,
) -> Dict[str, Any]:
    """Write a task package from a merged base's layers, atomically.

    Args:
        directory (str or Path): the package directory; new or empty, or (with
            ``overwrite``) one qalora-tune wrote.
        layers (Iterable[BaseLayer]): every quantized linear of the merged model.
        hf_config (Mapping): the base's ``config.json``.
        name (str, optional): the task's name; defaults to the directory's.
        source (Dict, optional): where the task came from (merged dir, adapter, report).
        overwrite (bool): replace a package (or merged model) qalora-tune wrote there.
        base (Tuple[str, str], optional): ``(name, fingerprint)`` of the base the package
            must fit; nothing is written if the layers' fingerprint differs.

    Returns:
        Dict[str, Any]: ``task.json`` as written.

    Raises:
        ValueError: for a directory holding other files, a base without quantized
            linears, mixed group sizes or bits, non-finite zero points, or another base
            than ``base``.
    """
    directory = Path(directory).expanduser()
    _check_target(directory, overwrite)
    name = directory.name if name is None else name
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise UserValueError(f"task name {name!r} must be a string of 1 to {_MAX_NAME} characters")
    collected = _collect(layers)
    if base is not None and collected["fingerprint"] != base[1]:
        raise UserValueError(
            f"the task's codes and scales differ from those of the base {base[0]} (fingerprint "
            f"{collected['fingerprint'][7:19]}... vs {base[1][7:19]}...): it was trained on "
            "another base; nothing written"
        )
    zeros = collected["zeros"]
    for key, zero in zeros.items():
        if not bool(torch.isfinite(zero).all()):
            raise UserValueError(f"{key} has non-finite zero points; the merge went wrong, nothing written")
    zero_dtype = str(next(iter(zeros.values())).dtype).removeprefix("torch.")
    zero_bytes = sum(t.numel() * t.element_size() for t in zeros.values())
    metadata = {
        "format": TASK_FORMAT,
        "format_version": TASK_FORMAT_VERSION,
        "name": name,
        "convention": CONVENTIONS[collected["storage"]],
        "zero_dtype": zero_dtype,
        "base": {
            "fingerprint": collected["fingerprint"],
            "fingerprint_definition": (
                "sha256 over the sorted per-layer sha256 of (key, shapes, group size, bits, "
                "int8 codes q - 2**(bits-1), scales as float64), rows in Hugging Face order"
            ),
            "group_size": collected["group_size"],
            "bits": collected["bits"],
            "scale_dtype": collected["scale_dtype"],
            "storage": collected["storage"],
            "config": essential_config(hf_config),
        },
        "layers": collected["layers"],
        "size": {
            "quantized_parameters": collected["quantized_parameters"],
            "zero_point_bytes": zero_bytes,
            "bits_per_quantized_parameter": 8 * zero_bytes / collected["quantized_parameters"],
        },
        "source": source or {},
        "written_by": {"qalora_tune": __version__, "torch": torch.__version__},
    }
    with atomic_directory(directory, setting="the task directory") as staging:
        save_file(zeros, str(staging / TASK_ZEROS_NAME), metadata={"format": "pt"})
        metadata["size"]["file_bytes"] = (staging / TASK_ZEROS_NAME).stat().st_size
        (staging / TASK_METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        (staging / OUTPUT_MARKER_NAME).write_text(
            json.dumps({"written_by": "qalora_tune", "kind": MARKER_KIND}) + "\n"
        )
    return metadata


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise UserValueError(f"{directory} is a file; choose a new directory for the task package")
    if directory.is_dir():
        entries = sorted(p.name for p in directory.iterdir())
        if not entries:
            return
        if OUTPUT_MARKER_NAME not in entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UserValueError(
                f"{directory} holds files qalora-tune did not write ({shown}); choose a new "
                "or empty directory for the task package"
            )
        if not overwrite:
            raise UserValueError(
                f"{directory} already holds qalora-tune output; choose another directory or "
                "replace it (overwrite=True, --force)"
            )


def export_task(
    model: nn.Module,
    directory: Union[str, Path],
    key_map: Optional[HFKeyMap] = None,
    hf_config: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
    source: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    merged_format: Optional[str] = None,
) -> Dict[str, Any]:
    """Write the task package of a merged model in memory.

    Args:
        model (nn.Module): a QA-LoRA model with its adapters merged, or a model from
            :func:`qalora_tune.load_merged` (with or without a task applied).
        directory (str or Path): the package directory.
        key_map (HFKeyMap, optional): the model's torchtune -> Hugging Face keys; defaults
            to the one :func:`qalora_tune.load_merged` attached.
        hf_config (Mapping, optional): the base's ``config.json``; same default.
        name (str, optional): the task's name; defaults to the directory's name.
        source (Dict, optional): recorded in ``task.json``.
        overwrite (bool): replace a qalora-tune output in ``directory``.
        merged_format (str, optional): take the zeros as a merged file of this format
            holds them (``auto``, ``intx``, ``int4_tile_packed``, ``int4_plain``): the
            package then equals that file's, and a base switched to it equals the task's
            own merged model loaded from that file. None (the default): the zeros as the
            model holds them, for a model from :func:`qalora_tune.load_merged`.

    Returns:
        Dict[str, Any]: ``task.json`` as written.

    Raises:
        ValueError: for unmerged adapters, a model without key map, or a bad target.
    """
    if key_map is None or hf_config is None:
        from qalora_tune.tasks.switch import task_state  # switch imports this module

        state = task_state(model, "export_task")
        key_map = key_map or state.key_map
        hf_config = hf_config or state.hf_config
    return write_task_package(
        directory, model_base_layers(model, key_map, merged_format), hf_config, name, source,
        overwrite,
    )


def export_task_from_merged(
    merged_dir: Union[str, Path],
    directory: Union[str, Path],
    name: Optional[str] = None,
    overwrite: bool = False,
    base_dir: Union[str, Path, None] = None,
) -> Dict[str, Any]:
    """Write the task package of a ``merged_int4/`` directory (e.g. a training run's).

    Reads the files one layer at a time: no model is built.

    Args:
        merged_dir (str or Path): the task's merged model.
        directory (str or Path): the package directory.
        name (str, optional): the task's name; defaults to the directory's name.
        overwrite (bool): replace a qalora-tune output in ``directory``.
        base_dir (str or Path, optional): the merged base the package is for; refused
            (nothing written) when its codes and scales differ from ``merged_dir``'s.

    Returns:
        Dict[str, Any]: ``task.json`` as written.
    """
    merged_dir = Path(merged_dir).expanduser()
    base = None
    if base_dir is not None:
        base_dir = Path(base_dir).expanduser()
        base = (str(base_dir), fingerprint_layers(read_merged_base(base_dir)[1]))
    hf_config, layers = read_merged_base(merged_dir)
    source = {"merged_dir": str(merged_dir), "base_dir": str(base_dir) if base_dir else None}
    return write_task_package(directory, layers, hf_config, name, source, overwrite, base)


def read_task_package(path: Union[str, Path]) -> TaskPackage:
    """Read and check a task package: JSON and safetensors only, nothing run.

    Checks the format, every field ``switch`` relies on, that the table's tensors are the
    layers ``task.json`` lists with their shapes and dtype, and that every zero is finite.

    Args:
        path (str or Path): the package directory.

    Returns:
        TaskPackage: with its zero points on CPU.

    Raises:
        FileNotFoundError: if the directory or a file is missing.
        ValueError: naming the package and what is wrong with it, in one line.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserFileNotFoundError(
            f"task package {path} not found; export one with qalora-tune export-task or "
            "tune run qalora_merge ... merged_format=zero_table"
        )
    fix = "export the task again (qalora-tune export-task)"
    metadata = read_json(path / TASK_METADATA_NAME, f"task package {path}:", fix)
    _check_metadata(metadata, path)
    zeros_path = path / TASK_ZEROS_NAME
    if not zeros_path.exists():
        raise UserFileNotFoundError(f"task package {path} lacks {TASK_ZEROS_NAME}; {fix}")
    if not is_regular_file_inside(zeros_path, path):
        raise UserValueError(
            f"task package {path}: {TASK_ZEROS_NAME} is not a regular file inside the "
            f"package (a link elsewhere?); {fix}"
        )
    zeros = _read_zeros(zeros_path, path, fix)
    _check_zeros(zeros, metadata, path)
    return TaskPackage(path=path, metadata=metadata, zeros=zeros)


def _read_zeros(zeros_path: Path, path: Path, fix: str) -> Dict[str, torch.Tensor]:
    try:
        with safe_open(str(zeros_path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own types for truncated/corrupt files
        reason = " ".join(str(error).split())[:200]
        raise UserValueError(
            f"task package {path}: {TASK_ZEROS_NAME} cannot be read ({reason}); the file is "
            f"truncated or corrupt; {fix}"
        ) from None


def _bad(path: Path, what: str) -> UserValueError:
    return UserValueError(f"task package {path}: {what}; export the task again (qalora-tune export-task)")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_metadata(metadata: Dict[str, Any], path: Path) -> None:
    """Types and values of every ``task.json`` field the switch reads."""
    if metadata.get("format") != TASK_FORMAT:
        raise _bad(path, f"{TASK_METADATA_NAME} is not a {TASK_FORMAT!r} (format={metadata.get('format')!r})")
    if metadata.get("format_version") != TASK_FORMAT_VERSION:
        raise _bad(
            path, f"format_version={metadata.get('format_version')!r}, this qalora-tune reads "
            f"{TASK_FORMAT_VERSION}"
        )
    name = metadata.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
        raise _bad(path, f"name={name!r} is not a task name")
    if metadata.get("zero_dtype") not in _ZERO_DTYPES:
        raise _bad(path, f"zero_dtype={metadata.get('zero_dtype')!r} is not one of {sorted(_ZERO_DTYPES)}")
    base = metadata.get("base")
    if not isinstance(base, dict):
        raise _bad(path, "no 'base' entry")
    fingerprint = base.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint.startswith("sha256:") or len(fingerprint) != 71:
        raise _bad(path, f"base fingerprint {fingerprint!r} is not 'sha256:' and 64 hex digits")
    if not _positive_int(base.get("group_size")):
        raise _bad(path, f"group_size={base.get('group_size')!r} is not a positive integer")
    if base.get("bits") not in SUPPORTED_BITS or isinstance(base.get("bits"), bool):
        raise _bad(path, f"bits={base.get('bits')!r} is not a supported bit width")
    if base.get("scale_dtype") not in _ZERO_DTYPES:
        raise _bad(path, f"scale_dtype={base.get('scale_dtype')!r} is not a float dtype")
    if base.get("storage") not in _STORAGES:
        raise _bad(path, f"storage={base.get('storage')!r} is not one of {_STORAGES}")
    if not isinstance(base.get("config"), dict):
        raise _bad(path, "the base's config essentials are missing")
    layers = metadata.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise _bad(path, "'layers' lists no quantized layer")
    for key, entry in layers.items():
        shape = entry.get("zero_shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(map(_positive_int, shape))):
            raise _bad(path, f"layer {key} has no (out_features, n_groups) zero_shape")


def _check_zeros(zeros: Dict[str, torch.Tensor], metadata: Dict[str, Any], path: Path) -> None:
    """The table holds exactly the listed layers, with their shapes, dtype, finite values."""
    listed = metadata["layers"]
    missing = sorted(set(listed) - set(zeros))
    extra = sorted(set(zeros) - set(listed))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which task.json does not list"
        raise _bad(path, f"{TASK_ZEROS_NAME} {which} ({len(missing)} missing, {len(extra)} extra)")
    dtype = _ZERO_DTYPES[metadata["zero_dtype"]]
    for key, zero in zeros.items():
        shape = tuple(listed[key]["zero_shape"])
        if tuple(zero.shape) != shape:
            raise _bad(path, f"{key} has shape {tuple(zero.shape)} where task.json says {shape}")
        if zero.dtype != dtype:
            raise _bad(path, f"{key} is {zero.dtype} where task.json says {metadata['zero_dtype']}")
        if not bool(torch.isfinite(zero).all()):
            bad = int((~torch.isfinite(zero)).sum())
            raise _bad(path, f"{key} holds {bad} NaN or infinite zero points")

