"""AdapterConfig: what a saved QA-LoRA adapter is, and what it was trained on.

Written as the ``"qalora_tune"`` entry of ``adapter/adapter_config.json`` (beside PEFT's own
keys) and read back, checked, before any tensor of the adapter is used. Merging, resuming
and evaluating compare it with the model at hand.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from qalora_tune.errors import UserValueError
from qalora_tune.models import MOVED_BUILDERS
from qalora_tune.modules import POOLINGS

__all__ = ["AdapterConfig", "POOLING_NOTES", "as_adapter_config"]

POOLING_NOTES = {
    "sum": (
        "the adapter's input is the sum over each group of group_size inputs (the paper's "
        "Algorithm 1); PEFT multiplies the mean by n_groups, which lora_alpha/alpha_pattern "
        "here already account for (alpha * group_size / n_groups)"
    ),
    "mean": (
        "the adapter's input is the mean over each group of group_size inputs (qalora-tune "
        "before 0.2); for sum pooling divide lora_A by group_size; PEFT multiplies the mean "
        "by n_groups, which lora_alpha/alpha_pattern here already account for "
        "(alpha / n_groups)"
    ),
}
"""The ``pooling_note`` written beside ``pooling``, for readers of the JSON."""


@dataclass
class AdapterConfig:
    """A QA-LoRA adapter's description.

    Args:
        rank (int): adapter rank.
        alpha (float): scaling numerator (the update is scaled by ``alpha / rank``).
        group_size (int): the base's quantization group size, also the pooling group.
        bits (int): the base's bit width.
        quantizer (str): how the base was quantized (``rtn``, ``hqq``, ``gptq``).
        pad_in_dim (bool): linears were zero-padded to whole groups.
        double_quant_scales (bool): the base kept its scales as 8-bit codes.
        lora_dropout (float): the dropout trained with.
        target_modules (List[str]): the adapted layers (torchtune names).
        model (Dict[str, Any]): the builder (``_component_``) and arguments that build the
            same model without adapters.
        model_type (str, optional): the checkpointer's model type (key layout).
        checkpoint_format (str): the base checkpoint's format.
        dtype (str, optional): the training dtype.
        base_checkpoint_dir (str, optional): where the base was read.
        base_fingerprint (str, optional): the base checkpoint's fingerprint.
        calibration (Dict[str, Any], optional): GPTQ calibration settings of the base.
        versions (Dict[str, str]): package versions at training time.
        pooling (str): the pooled input's convention, one of
            :data:`~qalora_tune.modules.POOLINGS`: ``"sum"`` (what this version trains) or
            ``"mean"`` (adapters of earlier versions; a file without the entry is one).
    """

    rank: int
    alpha: float
    group_size: int
    bits: int = 4
    quantizer: str = "rtn"
    pad_in_dim: bool = False
    double_quant_scales: bool = False
    lora_dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)
    model: Dict[str, Any] = field(default_factory=dict)
    model_type: Optional[str] = None
    checkpoint_format: str = "hf"
    dtype: Optional[str] = None
    base_checkpoint_dir: Optional[str] = None
    base_fingerprint: Optional[str] = None
    calibration: Optional[Dict[str, Any]] = None
    versions: Dict[str, str] = field(default_factory=dict)
    pooling: str = "sum"

    @property
    def model_builder(self) -> Optional[str]:
        """The model builder's dotted path (the ``model`` entry's ``_component_``)."""
        return self.model.get("_component_")

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``"qalora_tune"`` in ``adapter_config.json``)."""
        data = asdict(self)
        if self.calibration is None:
            del data["calibration"]
        data.update(
            format="qalora_tune",
            pooling_note=POOLING_NOTES.get(self.pooling),
            model_builder=self.model_builder,
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Union[str, Path] = "the adapter config") -> "AdapterConfig":
        """Read the JSON form, checking every entry's type (entries this version does not
        know are ignored; ones an older version did not write take their defaults).

        Raises:
            UserValueError: naming ``source`` and the entry that is wrong.
        """
        if not isinstance(data, Mapping):
            raise UserValueError(f"{source}: the qalora_tune entry is not an object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for required in ("rank", "alpha", "group_size"):
            if required not in values:
                raise UserValueError(
                    f"{source} has no qalora_tune.{required}; it was not written by qalora-tune: "
                    "use the adapter_config.json written with the adapter"
                )
        # written before the entry existed: the group mean was the only convention
        values.setdefault("pooling", "mean")
        if "model" not in values and isinstance(data.get("model_builder"), str):
            values["model"] = {"_component_": data["model_builder"]}
        model = values.get("model")
        if isinstance(model, dict) and model.get("_component_") in MOVED_BUILDERS:
            values["model"] = dict(model, _component_=MOVED_BUILDERS[model["_component_"]])
        config = cls(**values)
        config._check(source)
        return config

    def _check(self, source: Union[str, Path]) -> None:
        checks = (
            ("rank", "a positive integer", _positive_int(self.rank)),
            ("alpha", "a positive number", _number(self.alpha) and self.alpha > 0),
            ("group_size", "a positive integer", _positive_int(self.group_size)),
            ("bits", "a positive integer", _positive_int(self.bits)),
            ("quantizer", "a text", isinstance(self.quantizer, str)),
            ("pad_in_dim", "True or False", isinstance(self.pad_in_dim, bool)),
            ("double_quant_scales", "True or False", isinstance(self.double_quant_scales, bool)),
            ("lora_dropout", "a number in [0, 1)", _number(self.lora_dropout) and 0 <= self.lora_dropout < 1),
            ("target_modules", "a list of module names",
             isinstance(self.target_modules, list) and all(isinstance(m, str) for m in self.target_modules)),
            ("model", "an object", isinstance(self.model, dict)),
            ("base_fingerprint", "a text or null", self.base_fingerprint is None or isinstance(self.base_fingerprint, str)),
            ("calibration", "an object or null", self.calibration is None or isinstance(self.calibration, dict)),
            ("pooling", f"one of {', '.join(POOLINGS)}", self.pooling in POOLINGS),
        )
        for key, kind, ok in checks:
            if not ok:
                raise UserValueError(
                    f"{source} has qalora_tune.{key}={getattr(self, key)!r}, not {kind}; the file "
                    "was edited or is not qalora-tune's: use the adapter_config.json written with "
                    "the adapter"
                )


def as_adapter_config(value: Union[AdapterConfig, Mapping[str, Any]]) -> AdapterConfig:
    """``value`` as an :class:`AdapterConfig` (a mapping is read with ``from_dict``)."""
    return value if isinstance(value, AdapterConfig) else AdapterConfig.from_dict(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
