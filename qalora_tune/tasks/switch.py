"""Switching the task of a loaded int4 base in place: write a task package's zero points.

    model = qalora_tune.load_merged("base_int4", task="tasks/shakespeare")
    model.load_task("tasks/alpaca")          # O(number of groups): codes and scales untouched

:func:`qalora_tune.load_merged` calls :func:`enable_task_switching` on every model it
returns, which attaches ``model.load_task``. Other models (a training model after
``merge()``) get it from :func:`enable_task_switching` with their key map and config.

A switch is all or nothing. Before any zero is written, the package is read and checked
(:func:`~qalora_tune.tasks.zero_table.read_task_package`), and checked against the model:
config essentials, layer set and shapes, group size, bits, dtype, and the fingerprint of
the base's codes and scales. The fingerprint is computed once per loaded model (it reads
every code) and kept while the layers hold the same weight tensors, so later switches cost
reading the table and one copy per layer. Every new zero is computed, in the storage's own
convention, before the first is written (:func:`zeros_in_storage`): a table kept as the
model keeps its zeros is copied; one of another storage is converted exactly as
:func:`qalora_tune.load_merged` converts a file of that storage (``z = -zp * s`` in float64
through float32 from an intx file, ``zp = -z / s`` in float64 into intx), so a switched
model is bit for bit the task's own merged model, whatever format its files have.
"""

import time
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from qalora_tune.checkpointing import HFKeyMap
from qalora_tune.errors import UserValueError
from qalora_tune.modules import QALoRALinear, QuantizedLinear
from qalora_tune.quantization.base_weight import from_torchao_base, stored_zero_points
from qalora_tune.quantization.double_quant import is_double_quant
from qalora_tune.quantization.int4_weight import is_int4_weight
from qalora_tune.quantization.intx_weight import is_intx_weight
from qalora_tune.quantization.plain_int4 import is_plain_int4
from qalora_tune.tasks.base_layers import canonical_layer, fingerprint_layers, model_layers
from qalora_tune.tasks.zero_table import (
    TaskPackage,
    essential_config,
    read_task_package,
)

__all__ = [
    "TaskState",
    "current_task",
    "enable_task_switching",
    "load_task",
    "model_fingerprint",
    "task_state",
    "zeros_in_storage",
]

_STATE = "_qalora_tasks"


@dataclass
class TaskState:
    """What a model needs to switch tasks; kept on the model by :func:`enable_task_switching`.

    Attributes:
        key_map (HFKeyMap): torchtune <-> Hugging Face keys of the model.
        hf_config (Dict): the base's ``config.json``.
        base (str): the base, as named in messages (its directory).
        task (Dict, optional): the task applied last (None: the model as loaded).
    """

    key_map: HFKeyMap
    hf_config: Dict[str, Any]
    base: str
    task: Optional[Dict[str, Any]] = None
    _layers: Optional[Dict[str, Tuple[QuantizedLinear, torch.Tensor]]] = None
    _fingerprint: Optional[str] = None
    _weights: List[Tuple[QuantizedLinear, "weakref.ReferenceType"]] = field(default_factory=list)
    _fingerprints_computed: int = 0


def enable_task_switching(
    model: nn.Module,
    key_map: HFKeyMap,
    hf_config: Mapping[str, Any],
    base: Union[str, Path] = "the model",
    task: Union[str, Path, TaskPackage, None] = None,
) -> nn.Module:
    """Attach ``model.load_task`` (and apply ``task`` if given); returns ``model``.

    Args:
        model (nn.Module): a model whose quantized linears are ``QuantizedLinear``.
        key_map (HFKeyMap): its torchtune -> Hugging Face key conversion.
        hf_config (Mapping): the base's ``config.json``.
        base (str or Path): how messages name the base (its directory).
        task (str, Path or TaskPackage, optional): a task package to apply now.
    """
    setattr(model, _STATE, TaskState(key_map, dict(hf_config), str(base)))
    model.load_task = types.MethodType(load_task, model)
    if task is not None:
        load_task(model, task)
    return model


def task_state(model: nn.Module, action: str = "load_task") -> TaskState:
    """The model's :class:`TaskState`.

    Raises:
        ValueError: if the model was not prepared for tasks.
    """
    state = getattr(model, _STATE, None)
    if not isinstance(state, TaskState):
        raise UserValueError(
            f"{action}: this model has no key map for task tables; load it with "
            "qalora_tune.load_merged(...), or call qalora_tune.tasks.enable_task_switching("
            "model, key_map, hf_config) first"
        )
    return state


def current_task(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The task applied last to ``model`` (name, path, fingerprint), or None."""
    state = getattr(model, _STATE, None)
    return state.task if isinstance(state, TaskState) else None


def _layers(model: nn.Module, state: TaskState) -> Dict[str, Tuple[QuantizedLinear, torch.Tensor]]:
    """Hugging Face key -> (layer, row order to Hugging Face's), built once per model."""
    if state._layers is None:
        state._layers = {key: (m, rows) for key, m, rows in model_layers(model, state.key_map)}
    return state._layers


def model_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the model's base (codes and scales), computed once and kept while
    its layers hold the same weight tensors."""
    state = task_state(model, "model_fingerprint")
    layers = _layers(model, state)
    if state._fingerprint is not None and all(
        ref() is module.weight for module, ref in state._weights
    ):
        return state._fingerprint
    state._fingerprint = fingerprint_layers(  # one layer's codes at a time
        canonical_layer(key, module.weight, module.bits, module.in_dim, rows)
        for key, (module, rows) in layers.items()
    )
    state._fingerprints_computed += 1
    state._weights = [(module, weakref.ref(module.weight)) for module, _ in layers.values()]
    return state._fingerprint


def load_task(model: nn.Module, task: Union[str, Path, TaskPackage]) -> Dict[str, Any]:
    """Replace every zero point of ``model`` with a task package's, in place.

    Codes and scales are not touched; nothing is written unless the whole package fits.

    Args:
        model (nn.Module): prepared by :func:`enable_task_switching` (every model from
            :func:`qalora_tune.load_merged` is).
        task (str, Path or TaskPackage): the package directory, or one already read.

    Returns:
        Dict[str, Any]: the task's name and path, the layers and bytes written, and the
        seconds spent reading, checking (fingerprint included) and writing.

    Raises:
        FileNotFoundError: if the package is missing.
        ValueError: in one line naming the package and the base, for a package that does
            not fit the model; the model is then unchanged.
    """
    start = time.perf_counter()
    state = task_state(model, "load_task")
    package = task if isinstance(task, TaskPackage) else read_task_package(task)
    read_done = time.perf_counter()
    computed = state._fingerprints_computed
    writes = _plan(model, state, package)
    checked = time.perf_counter()
    with torch.no_grad():
        for view, values in writes:
            view.copy_(values)
    done = time.perf_counter()
    state.task = {
        "name": package.name,
        "path": str(package.path),
        "fingerprint": package.base["fingerprint"],
    }
    return {
        **state.task,
        "layers": len(writes),
        "zero_point_bytes": package.nbytes,
        "read_seconds": read_done - start,
        "check_seconds": checked - read_done,
        "fingerprint_computed": state._fingerprints_computed > computed,
        "write_seconds": done - checked,
        "seconds": done - start,
    }


def _mismatch(package: TaskPackage, state: TaskState, what: str, fix: str) -> UserValueError:
    return UserValueError(f"task package {package.path} does not fit the base {state.base}: {what}; {fix}")


def _plan(
    model: nn.Module, state: TaskState, package: TaskPackage
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Check the whole package against the model; return (stored zeros view, new values)."""
    adapted = next((n for n, m in model.named_modules() if isinstance(m, QALoRALinear)), None)
    if adapted is not None:
        raise UserValueError(
            f"load_task switches merged models (qalora_tune.load_merged); {adapted} of this "
            "model is a QA-LoRA layer with its own adapter: export it with export_task, or "
            "load the merged model"
        )
    other = "load the base the task was exported from, or export the task from this base"
    config = essential_config(state.hf_config)
    for key, value in package.base["config"].items():
        if key in config and config[key] != value:
            raise _mismatch(
                package, state,
                f"it was made for another model ({key}={value!r} there, {config[key]!r} here)", other,
            )
    layers = _layers(model, state)
    missing = sorted(set(layers) - set(package.zeros))
    extra = sorted(set(package.zeros) - set(layers))
    if missing or extra:
        what = (
            f"it has no zero points for {missing[0]}" if missing
            else f"it has zero points for {extra[0]}, which the model lacks"
        )
        raise _mismatch(package, state, f"{what} ({len(missing)} missing, {len(extra)} extra)", other)
    base = package.base
    writes = []
    for key, (module, rows) in layers.items():
        if module.group_size != base["group_size"] or module.bits != base["bits"]:
            raise _mismatch(
                package, state,
                f"group_size={base['group_size']}, bits={base['bits']} there, "
                f"{module.group_size} and {module.bits} here ({key})", other,
            )
        shape = (module.out_dim, module.n_groups)
        if tuple(package.zeros[key].shape) != shape:
            raise _mismatch(
                package, state, f"{key} has {tuple(package.zeros[key].shape)} zero points "
                f"where the model has {shape}", other,
            )
    fingerprint = model_fingerprint(model)
    if fingerprint != base["fingerprint"]:
        raise _mismatch(
            package, state,
            f"its base fingerprint {base['fingerprint'][7:19]}... differs from this base's "
            f"{fingerprint[7:19]}... (other codes or scales, or the base loaded in a dtype "
            "that rounds its scales)", other,
        )
    for key, (module, rows) in layers.items():
        stored = stored_zero_points(module.weight)
        zero = package.zeros[key].to(stored.device)[torch.argsort(rows).to(stored.device)]
        values = zeros_in_storage(module.weight, zero, base["storage"], stored.dtype)
        if not bool(torch.isfinite(values).all()):
            raise _mismatch(
                package, state, f"{key}'s zero points overflow {stored.dtype} in this storage",
                other,
            )
        writes.append((stored, values))
    return writes


def _stored_scales(weight: torch.Tensor) -> torch.Tensor:
    """The ``(out_features, n_groups)`` scales a quantized weight computes with (a view
    where the storage has one)."""
    if is_intx_weight(weight):
        return weight.scale
    if is_plain_int4(weight):
        return weight.scale.t()
    if is_int4_weight(weight) and not is_double_quant(weight):
        n, k = weight.shape
        return weight.scale_and_zero[: k // weight.block_size[1], :n, 0].t()
    return from_torchao_base(weight).scale  # 8-bit scales: decoded


def zeros_in_storage(
    weight: torch.Tensor, zero: torch.Tensor, storage: str, dtype: torch.dtype
) -> torch.Tensor:
    """A table's zeros (model rows, kept as ``storage`` keeps them) in the convention and
    dtype ``weight`` stores them, rounded as :func:`qalora_tune.load_merged` rounds a
    file's zeros into that storage.

    Args:
        weight (torch.Tensor): the quantized weight the zeros go into.
        zero (torch.Tensor): ``(out_features, n_groups)``: ``zp = -z / s`` when ``storage``
            is ``"intx"``, else ``z`` of ``(q - mid) s + z``.
        storage (str): the table's storage, ``"int4"`` or ``"intx"``.
        dtype (torch.dtype): the dtype ``weight`` stores its zeros in.
    """
    into_intx = is_intx_weight(weight)
    if storage == "intx":
        if into_intx:  # as reorder_intx_rows: the stored zp, cast
            return zero.to(dtype)
        # as from_torchao_intx then to_base: z = -zp * s in float64, through float32
        scale = _stored_scales(weight).double()
        return (-zero.double() * scale).float().to(dtype)
    if into_intx:  # as to_torchao_intx: zp = -z / s in float64, rounded once
        return (-zero.double() / weight.scale.double()).to(dtype)
    return zero.to(dtype)
