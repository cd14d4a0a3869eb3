"""``qalora_tune.load_merged``: a merged model, ready to switch tasks, with one applied.

    model = qalora_tune.load_merged("models/base_int4", task="tasks/shakespeare")
    model.load_task("tasks/alpaca")

The model is :func:`qalora_tune.checkpointing.load_merged`'s; this adds the key map and
config a task table needs (read again from the directory's JSON files) and
``model.load_task`` (:func:`~qalora_tune.tasks.switch.enable_task_switching`).
"""

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from qalora_tune.checkpointing import load_merged as load_merged_model
from qalora_tune.tasks.base_layers import read_merged_key_map
from qalora_tune.tasks.switch import enable_task_switching
from qalora_tune.tasks.zero_table import TaskPackage

__all__ = ["load_merged"]


def load_merged(
    path: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    task: Union[str, Path, TaskPackage, None] = None,
) -> nn.Module:
    """A torchtune model from a ``merged_int4/`` directory, with ``model.load_task``.

    Args:
        path (str or Path): the ``merged_int4/`` directory (a task's, or a task-free base).
        device (str or torch.device, optional): defaults to ``"cpu"``.
        dtype (torch.dtype, optional): compute dtype; defaults to the stored one.
        task (str, Path or TaskPackage, optional): a task package whose zero points
            replace the loaded ones (all or nothing).

    Returns:
        nn.Module: the model in eval mode (see
        :func:`qalora_tune.checkpointing.load_merged`).

    Raises:
        FileNotFoundError: if a file or the task package is missing.
        ValueError: if the files do not match, or the package does not fit the base.
    """
    model = load_merged_model(path, device=device, dtype=dtype)
    hf_config, key_map = read_merged_key_map(path)
    return enable_task_switching(model, key_map, hf_config, Path(path).expanduser(), task)
