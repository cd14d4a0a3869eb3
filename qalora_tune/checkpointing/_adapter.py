"""The trained adapter on disk, in Hugging Face PEFT's layout.

``adapter/adapter_model.safetensors`` holds, per adapted linear, PEFT's keys
``base_model.model.{hf_module}.lora_A.weight`` ``(rank, n_groups)`` and ``.lora_B.weight``
``(out_dim, rank)`` (rows in Hugging Face's order). ``adapter_config.json`` is a PEFT
``LoraConfig`` with ``use_qalora`` and ``qalora_group_size``, plus this project's own
description under the key ``"qalora_tune"``.

Pooling conventions differ (``docs/design.md``): this project sums each group (adapters
written by earlier qalora-tune averaged it; their metadata says ``"pooling": "mean"``, or
nothing), PEFT multiplies the average by ``n_groups = in_dim / group_size``. Instead of
rescaling ``A`` (which would round), the PEFT config carries ``lora_alpha = alpha *
group_size / n_groups`` per module (``alpha / n_groups`` for a mean-pooled adapter) in
``alpha_pattern``, so PEFT's formula gives the same function from the same tensors, and
reading the adapter back is exact (a row permutation at most). A mean-pooled adapter loads
into layers switched to mean pooling (:func:`adopt_pooling`): the same function and the
same merged zero points as when it was written, bit for bit.
"""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from qalora_tune._files import read_json
from qalora_tune.checkpointing._adapter_config import AdapterConfig, as_adapter_config
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.errors import UserFileNotFoundError, UserValueError
from qalora_tune.modules import QALoRALinear

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "adopt_pooling",
    "check_adapter_before_use",
    "check_adapter_matches",
    "check_resume_matches",
    "load_adapter_into",
    "read_adapter",
    "write_adapter",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIXES = {"lora_A": "lora_a", "lora_B": "lora_b"}


def write_adapter(
    directory: Path,
    layers: Mapping[str, QALoRALinear],
    key_map: HFKeyMap,
    metadata: Union[AdapterConfig, Mapping[str, Any]],
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``.

    Args:
        directory (Path): an existing directory.
        layers (Mapping[str, QALoRALinear]): adapted layers by torchtune module name.
        key_map (HFKeyMap): the model's torchtune -> Hugging Face key conversion.
        metadata (AdapterConfig): this project's description of the adapter (rank, alpha,
            group size, bits, pooling, targets, base fingerprint, versions, ...), stored
            under ``"qalora_tune"`` (a mapping is read with ``AdapterConfig.from_dict``).
    """
    metadata = as_adapter_config(metadata)
    if not layers:
        raise UserValueError("there are no adapted layers to write")
    poolings = {layer.pooling for layer in layers.values()}
    if len(poolings) > 1:
        raise UserValueError(
            f"the adapted layers mix pooling conventions {sorted(poolings)}; an adapter is "
            "written in one: load every layer's adapter from the same file"
        )
    # the description says what the tensors are: the layers' own convention
    metadata = replace(metadata, pooling=poolings.pop())
    tensors: Dict[str, torch.Tensor] = {}
    module_alpha: Dict[str, float] = {}
    for name, layer in layers.items():
        hf_key, rows = key_map.row_order(f"{name}.weight", layer.out_dim, to_hf=True)
        module = hf_key[: -len(".weight")]
        a = layer.lora_a.weight.detach()
        b = layer.lora_b.weight.detach()[rows.to(layer.lora_b.weight.device)]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.cpu().contiguous()
        # PEFT applies lora_alpha / r to mean * n_groups; the layer, scaling to the mean
        module_alpha[module] = layer.alpha * layer.pooling_factor / layer.n_groups
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config = _peft_config(module_alpha, metadata)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))


def _peft_config(module_alpha: Dict[str, float], metadata: AdapterConfig) -> Dict[str, Any]:
    default_alpha = Counter(module_alpha.values()).most_common(1)[0][0]
    # PEFT matches alpha_pattern keys against the end of module names
    alpha_pattern: Dict[str, float] = {}
    for module, alpha in module_alpha.items():
        if alpha != default_alpha:
            alpha_pattern[module.rsplit(".", 1)[-1]] = alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": metadata.base_checkpoint_dir,
        "r": metadata.rank,
        "lora_alpha": default_alpha,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": metadata.lora_dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in module_alpha}),
        "bias": "none",
        "use_qalora": True,
        "qalora_group_size": metadata.group_size,
        "inference_mode": True,
        "qalora_tune": metadata.to_dict(),
    }


def read_adapter(directory: Path, key_map: HFKeyMap) -> Tuple[Dict[str, torch.Tensor], AdapterConfig]:
    """Read an adapter written by :func:`write_adapter`.

    Args:
        directory (Path): the ``adapter/`` directory.
        key_map (HFKeyMap): the model's key conversion.

    Returns:
        Tuple[Dict[str, torch.Tensor], Dict[str, Any]]: the adapter weights under torchtune
        names (``layers.0.attn.q_proj.lora_a.weight``, bit for bit as trained) and the
        ``"qalora_tune"`` description.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if the files are not a qalora-tune adapter.
    """
    directory = Path(directory)
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
        if not (directory / name).is_file():
            raise UserFileNotFoundError(f"{directory / name} not found; point to an adapter/ directory")
    config = read_json(
        directory / ADAPTER_CONFIG_NAME, "the adapter config",
        "point to an adapter/ directory written by qalora-tune",
    )
    if not isinstance(config.get("qalora_tune"), dict):
        raise UserValueError(
            f"{directory / ADAPTER_CONFIG_NAME} is not a qalora-tune adapter (no 'qalora_tune' "
            "entry); only adapters written by qalora-tune can be merged exactly"
        )
    description = AdapterConfig.from_dict(config["qalora_tune"], directory / ADAPTER_CONFIG_NAME)
    try:
        peft_tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    except Exception as error:  # safetensors raises its own error types for bad files
        reason = " ".join(str(error).split())
        raise UserValueError(
            f"{directory / ADAPTER_WEIGHTS_NAME} cannot be read ({reason}): the file is "
            "truncated or corrupt; use the adapter/ directory of a finished save"
        ) from None
    tensors: Dict[str, torch.Tensor] = {}
    for key, value in peft_tensors.items():
        parts = key[len(PEFT_PREFIX):].rsplit(".", 2)
        if not key.startswith(PEFT_PREFIX) or len(parts) != 3 or parts[1] not in _PEFT_SUFFIXES:
            raise UserValueError(f"unexpected adapter key {key!r} in {directory}")
        module, kind, _ = parts
        peft_b = peft_tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        if peft_b is None or f"{PEFT_PREFIX}{module}.lora_A.weight" not in peft_tensors:
            raise UserValueError(f"{directory}: {module} lacks its lora_A or lora_B weight")
        try:
            tune_key, rows = key_map.row_order(f"{module}.weight", peft_b.shape[0], to_hf=False)
            tune_module = tune_key[: -len(".weight")]
            tensors[f"{tune_module}.{_PEFT_SUFFIXES[kind]}.weight"] = (
                value[rows] if kind == "lora_B" else value
            )
        except Exception as error:  # torchtune's converters raise a bare Exception
            raise UserValueError(
                f"{directory / ADAPTER_WEIGHTS_NAME}: {key} of shape {tuple(value.shape)} does "
                f"not fit the model's layer {module} ({type(error).__name__}); the adapter was "
                "trained for another model: set model._component_ to the one it was trained with"
            ) from None
    return tensors, description


def check_adapter_before_use(
    adapter: Mapping[str, torch.Tensor],
    metadata: AdapterConfig,
    adapter_dir: Path,
    base_fingerprint: Optional[str] = None,
) -> None:
    """Check a read adapter on its own, before any model is built or tensor used: the base
    it was trained on, and its tensors against its own description.

    Args:
        adapter (Mapping[str, torch.Tensor]): from :func:`read_adapter`.
        metadata (AdapterConfig): its description.
        adapter_dir (Path): named in the messages.
        base_fingerprint (str, optional): the fingerprint of the base at hand.

    Raises:
        UserValueError: for another base, tensors whose shapes disagree with the recorded
            rank or with each other, non-float tensors, or NaN/Inf values.
    """
    if base_fingerprint is not None and metadata.base_fingerprint != base_fingerprint:
        check_adapter_matches(metadata, {"base_fingerprint": base_fingerprint}, adapter_dir)
    rank = metadata.rank
    modules = sorted({key.rsplit(".", 2)[0] for key in adapter})
    if not modules:
        raise UserValueError(f"{adapter_dir / ADAPTER_WEIGHTS_NAME} holds no adapter weights")
    for module in modules:
        a, b = adapter[f"{module}.lora_a.weight"], adapter[f"{module}.lora_b.weight"]
        where = f"{adapter_dir / ADAPTER_WEIGHTS_NAME}: {module}"
        if not (a.is_floating_point() and b.is_floating_point()) or a.dim() != 2 or b.dim() != 2:
            raise UserValueError(f"{where} has lora weights that are not 2D float tensors; the file is not a qalora-tune adapter")
        if a.shape[0] != b.shape[1] or (rank is not None and a.shape[0] != rank):
            raise UserValueError(
                f"{where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not "
                f"fit rank={rank} in {adapter_dir / ADAPTER_CONFIG_NAME}; the adapter files do "
                "not belong together: use both files of one save"
            )
        for name, tensor in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(tensor).all()):
                raise UserValueError(
                    f"{where} {name} holds NaN or infinite values; it cannot be merged or used: "
                    "train again (lower optimizer.lr or set clip_grad_norm) or use an earlier "
                    "checkpoint's adapter"
                )


def adopt_pooling(
    layers: Iterable[QALoRALinear], metadata: Union[AdapterConfig, Mapping[str, Any]]
) -> str:
    """Set every layer to the adapter's pooling convention (``AdapterConfig.pooling``:
    ``"mean"`` for adapters written before the entry existed), so that its tensors, loaded
    unchanged, give the function and merge they were trained for.

    Returns:
        str: the convention.
    """
    pooling = as_adapter_config(metadata).pooling
    for layer in layers:
        layer.pooling = pooling
    return pooling


# (description key, the setting that changes it) compared by check_adapter_matches
_MATCHED_SETTINGS = (
    ("group_size", "model.group_size"),
    ("bits", "model.bits (the base's bit width)"),
    ("rank", "model.lora_rank"),
    ("alpha", "model.lora_alpha"),
    ("target_modules", "model.lora_attn_modules / apply_lora_to_mlp / apply_lora_to_output"),
    ("pad_in_dim", "model.pad_in_dim"),
    ("double_quant_scales", "model.double_quant_scales (8-bit scales round the base)"),
)

def check_adapter_matches(
    adapter: Union[AdapterConfig, Mapping[str, Any]], expected: Mapping[str, Any], adapter_dir: Path
) -> None:
    """Refuse an adapter trained for another base or another quantization.

    Args:
        adapter (AdapterConfig): the adapter's description.
        expected (Dict[str, Any]): the same entries for the model and base at hand
            (``group_size``, ``bits``, ``rank``, ``alpha``, ``target_modules``,
            ``pad_in_dim``, ``base_fingerprint``).
        adapter_dir (Path): named in the messages.

    Raises:
        ValueError: naming the first mismatch and the setting to change.
    """
    adapter = as_adapter_config(adapter)
    for key, setting in _MATCHED_SETTINGS:
        value = getattr(adapter, key)
        if key in expected and value != expected[key]:
            raise UserValueError(
                f"the adapter in {adapter_dir} has {key}={value!r} but the model "
                f"has {key}={expected[key]!r}; set {setting} to match the adapter (a QA-LoRA "
                "adapter merges exactly only into the base quantization it was trained on)"
            )
    if adapter.base_fingerprint != expected.get("base_fingerprint"):
        raise UserValueError(
            f"the adapter in {adapter_dir} was trained on another base checkpoint "
            f"({adapter.base_checkpoint_dir}, fingerprint "
            f"{str(adapter.base_fingerprint)[:12]}...) than checkpointer.checkpoint_dir "
            f"(fingerprint {str(expected.get('base_fingerprint'))[:12]}...); point "
            "checkpointer.checkpoint_dir to the base the adapter was trained on"
        )


@torch.no_grad()
def load_adapter_into(
    layers: Mapping[str, QALoRALinear],
    adapter: Mapping[str, torch.Tensor],
    metadata: AdapterConfig,
    adapter_dir: Path,
    base_fingerprint: str,
    pad_in_dim: bool,
) -> None:
    """Copy a read adapter into a model's QA-LoRA layers, after checking it fits them.

    Args:
        layers (Mapping[str, QALoRALinear]): the model's adapted layers by clean module
            name (as the adapter's keys name them).
        adapter (Mapping[str, torch.Tensor]): ``{name}.lora_a.weight`` / ``.lora_b.weight``
            from :func:`read_adapter`.
        metadata (AdapterConfig): the adapter's description.
        adapter_dir (Path): named in the messages.
        base_fingerprint (str): the fingerprint of the base the model was loaded from.
        pad_in_dim (bool): the model's ``pad_in_dim`` setting.

    The layers take the adapter's pooling convention (:func:`adopt_pooling`): an adapter
    written with mean pooling (earlier qalora-tune) computes and merges as it did then.

    Raises:
        ValueError: if the model has no QA-LoRA layers, or the adapter was trained for
            another base, quantization or set of layers (see :func:`check_adapter_matches`).
    """
    first = next(iter(layers.values()), None)
    if first is None:
        raise UserValueError(
            "the config's model has no QA-LoRA layers to load the adapter into; set "
            "model.lora_attn_modules / model.apply_lora_to_mlp as in training"
        )
    expected = {
        "group_size": first.group_size,
        "bits": first.bits,
        "rank": first.rank,
        "alpha": first.alpha,
        "target_modules": sorted(layers),
        "pad_in_dim": pad_in_dim,
        "double_quant_scales": first.double_quant_scales,
        "base_fingerprint": base_fingerprint,
    }
    check_adapter_matches(metadata, expected, adapter_dir)
    check_adapter_before_use(adapter, metadata, adapter_dir)
    stored = {key.rsplit(".", 2)[0] for key in adapter}
    if stored != set(layers):
        extra, lacking = sorted(stored - set(layers))[:3], sorted(set(layers) - stored)[:3]
        raise UserValueError(
            f"the adapter in {adapter_dir} does not fit this model's layers (only in the "
            f"adapter: {extra}; only in the model: {lacking}); it was trained for another "
            "model: set model._component_ and the adapter targets to those it was trained with"
        )
    adopt_pooling(layers.values(), metadata)
    for name, layer in layers.items():
        for part in ("lora_a", "lora_b"):
            value = adapter[f"{name}.{part}.weight"]
            target = getattr(layer, part).weight
            if tuple(value.shape) != tuple(target.shape):
                raise UserValueError(
                    f"the adapter in {adapter_dir} has {name}.{part} of shape "
                    f"{tuple(value.shape)} where this model has {tuple(target.shape)}; it was "
                    "trained for another model size or group size: set model._component_ and "
                    "model.group_size to those it was trained with"
                )
            target.copy_(value)


# (description key, the setting that changes it) that must not change across a resume
_RESUMED_SETTINGS = (
    ("model_builder", "model._component_"),  # compared by path: the builder's arguments may differ
    ("bits", "model.bits"),
    ("group_size", "model.group_size"),
    ("quantizer", "model.quantizer"),
    ("pad_in_dim", "model.pad_in_dim"),
    ("double_quant_scales", "model.double_quant_scales"),
    ("rank", "model.lora_rank"),
    ("alpha", "model.lora_alpha"),
    ("target_modules", "model.lora_attn_modules / apply_lora_to_mlp / apply_lora_to_output"),
)


def check_resume_matches(
    saved: Union[AdapterConfig, Mapping[str, Any]],
    current: Union[AdapterConfig, Mapping[str, Any]],
    checkpoint: Path,
) -> None:
    """Refuse to resume a checkpoint written for another model, adapter or base.

    Args:
        saved (Dict[str, Any]): the checkpoint's adapter description (``"qalora_tune"`` of
            its ``adapter_config.json``, as :func:`read_adapter` returns it).
        current (Dict[str, Any]): the same description of the run being set up (the
            recipe's ``_adapter_config()``).
        checkpoint (Path): the checkpoint directory, named in the messages.

    Raises:
        ValueError: naming the first setting that differs (model, adapter, or the
            calibration of a calibrated base), both values, and how to resume
            (set it back) or start over (``resume_from_checkpoint=False`` or another
            ``output_dir``).
    """
    saved, current = as_adapter_config(saved), as_adapter_config(current)
    start_over = (
        "or set resume_from_checkpoint=False (or another output_dir) to start a new run"
    )
    for key, setting in _RESUMED_SETTINGS:
        before, now = getattr(saved, key), getattr(current, key)
        if before != now:
            raise UserValueError(
                f"resume_from_checkpoint=True but {checkpoint} was trained with "
                f"{_difference(key, before, now)}; set {setting} back to resume it, {start_over}"
            )
    # a calibrated base (GPTQ) depends on its calibration settings too
    saved_calibration, current_calibration = saved.calibration, current.calibration
    if saved_calibration is not None and current_calibration is not None:
        for key in sorted(set(saved_calibration) | set(current_calibration)):
            saved_value, current_value = saved_calibration.get(key), current_calibration.get(key)
            if saved_value != current_value:
                setting = f"calibration.{key}"
                raise UserValueError(
                    f"resume_from_checkpoint=True but {checkpoint} was trained on a base "
                    f"calibrated with {_difference(setting, saved_value, current_value)}; "
                    f"set {setting} back to resume it, {start_over}"
                )
    saved_base, current_base = saved.base_fingerprint, current.base_fingerprint
    if saved_base is not None and current_base is not None and saved_base != current_base:
        raise UserValueError(
            f"resume_from_checkpoint=True but {checkpoint} was trained on another base "
            f"checkpoint ({saved.base_checkpoint_dir}, fingerprint {saved_base[:12]}...) "
            f"than checkpointer.checkpoint_dir ({current.base_checkpoint_dir}, "
            f"fingerprint {current_base[:12]}...); set checkpointer.checkpoint_dir to the "
            f"base it was trained on, {start_over}"
        )


def _difference(key: str, saved: Any, current: Any) -> str:
    """``"key=saved and this config gives key=current"``; for adapter targets, the
    counts and the first layers on only one side."""
    if key != "target_modules":
        return f"{key}={saved!r} and this config gives {key}={current!r}"
    only_saved = sorted(set(saved) - set(current))[:3]
    only_current = sorted(set(current) - set(saved))[:3]
    return (
        f"adapters on {len(saved)} layers and this config puts them on {len(current)} "
        f"(only in the checkpoint: {only_saved}; only in the config: {only_current})"
    )
