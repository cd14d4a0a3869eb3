"""Task packages in transformers: overwrite a ``from_pretrained`` base's zero points.

transformers loads a ``merged_int4/`` directory as torchao tensors under the same Hugging
Face keys a task package uses, so applying a task is a copy per linear through the state
dict (``keep_vars=True``: the parameters themselves, not detached copies):

    from transformers import AutoModelForCausalLM
    from qalora_tune.tasks import load_task_into_transformers

    model = AutoModelForCausalLM.from_pretrained("base_int4")
    load_task_into_transformers(model, "tasks/alpaca")

By hand, without the checks, for the default merged format on CPU (``intx``: stock
torchao's ``IntxUnpackedToInt8Tensor``, whose ``zero_point`` the table holds as stored):

    from safetensors.torch import load_file
    state = model.state_dict(keep_vars=True)
    for key, zero in load_file("tasks/alpaca/zero_points.safetensors").items():
        state[key].zero_point.copy_(zero)

:func:`load_task_into_transformers` checks the package as ``model.load_task`` does (the
fingerprint of the model's codes and scales included, computed on every call), writes
nothing unless all of it fits, and converts a table of another storage the way
``model.load_task`` does (:func:`~qalora_tune.tasks.switch.zeros_in_storage`).
"""

from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

from qalora_tune.errors import UserValueError
from qalora_tune.quantization.int4_weight import is_int4_weight
from qalora_tune.quantization.int4_weight import zero_points as int4_zero_points
from qalora_tune.quantization.intx_weight import is_intx_weight
from qalora_tune.quantization.plain_int4 import is_plain_int4
from qalora_tune.tasks.base_layers import base_fingerprint, canonical_layer, layer_digest
from qalora_tune.tasks.switch import zeros_in_storage
from qalora_tune.tasks.zero_table import TaskPackage, read_task_package

__all__ = ["load_task_into_transformers"]


def _stored_zeros(weight: torch.Tensor) -> torch.Tensor:
    """A writable ``(out_features, n_groups)`` view of a transformers torchao weight's zeros."""
    if is_plain_int4(weight):
        return weight.zero_point.t()
    if is_intx_weight(weight):
        return weight.zero_point
    if is_int4_weight(weight):  # Int4TilePackedTo4dTensor: the zeros plane of scale_and_zero
        return int4_zero_points(weight)
    raise UserValueError(f"a {type(weight).__name__} weight has no zero points this helper writes")


def load_task_into_transformers(
    model: nn.Module, task: Union[str, Path, TaskPackage]
) -> Dict[str, Any]:
    """Write a task package's zero points into a transformers model of its base.

    Args:
        model (nn.Module): ``AutoModelForCausalLM.from_pretrained(merged_dir)`` of a
            ``merged_int4/`` directory (torchao ``Int4Tensor`` or ``IntxUnpackedToInt8Tensor``
            linears).
        task (str, Path or TaskPackage): the package.

    Returns:
        Dict[str, Any]: the task's name and the number of layers written.

    Raises:
        ValueError: in one line, if the package does not fit the model (nothing written).
    """
    package = task if isinstance(task, TaskPackage) else read_task_package(task)
    bits = package.base["bits"]
    state = model.state_dict(keep_vars=True)  # the parameters themselves
    quantized = {
        k: v for k, v in state.items() if is_plain_int4(v) or is_intx_weight(v) or is_int4_weight(v)
    }

    def mismatch(what: str) -> UserValueError:
        return UserValueError(
            f"task package {package.path} does not fit this transformers model: {what}; load "
            "the base the task was exported from"
        )

    missing = sorted(set(quantized) - set(package.zeros))
    extra = sorted(set(package.zeros) - set(quantized))
    if missing or extra:
        raise mismatch(
            f"no zero points for {missing[0]}" if missing else f"{extra[0]} is not a quantized weight here"
        )
    digests = {}
    for key, weight in quantized.items():
        stored = _stored_zeros(weight)
        if tuple(stored.shape) != tuple(package.zeros[key].shape):
            raise mismatch(f"{key} has {tuple(stored.shape)} zero points, the package {tuple(package.zeros[key].shape)}")
        if str(stored.dtype).removeprefix("torch.") != package.base["scale_dtype"]:
            raise mismatch(f"{key} stores {stored.dtype}, the package's base {package.base['scale_dtype']}")
        digests[key] = layer_digest(canonical_layer(key, weight, bits, weight.shape[1]))
    fingerprint = base_fingerprint(digests)
    if fingerprint != package.base["fingerprint"]:
        raise mismatch(
            f"base fingerprint {package.base['fingerprint'][7:19]}... there, {fingerprint[7:19]}... "
            "here (other codes or scales)"
        )
    writes = []
    for key, weight in quantized.items():
        stored = _stored_zeros(weight)
        values = zeros_in_storage(
            weight, package.zeros[key].to(stored.device), package.base["storage"], stored.dtype
        )
        if not bool(torch.isfinite(values).all()):
            raise mismatch(f"{key}'s zero points overflow {stored.dtype}")
        writes.append((stored, values))
    with torch.no_grad():
        for stored, values in writes:
            stored.copy_(values)
    return {"name": package.name, "path": str(package.path), "layers": len(writes)}
