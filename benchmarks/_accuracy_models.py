"""The models of ``benchmarks/accuracy.py`` (fp32, quantized bases, QA-LoRA, LoRA and
QLoRA, all from the checkpoint's fp32 weights) and their training, through the
fine-tuning recipe's loss and optimizer steps."""

import argparse
import math
import tempfile
from collections.abc import Callable, Iterator

import torch
from _accuracy_common import (
    ALPHA,
    ATTENTION_TARGETS,
    BUILDER,
    MODEL_SUBDIR,
    NF4_BLOCK_SIZE,
    RANK,
    WARMUP_FRACTION,
    nf4_scaler_block_size,
)
from _accuracy_data import Batch, TargetData
from torch import nn

State = dict[str, torch.Tensor]


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    steps: int,
    lr: float,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> list[float]:
    """AdamW (no weight decay) on the trainable parameters, linear warmup (over 10% of the
    steps unless ``warmup_steps`` is given) then cosine decay to ``min_lr_ratio * lr``
    (zero by default), through the fine-tuning recipe's loss and optimizer steps (one
    micro-batch per step). Stops at the first non-finite loss, before its update.

    Returns:
        List[float]: the training loss of every step run.
    """
    from qalora_tune.recipe_utils import (
        IGNORE_INDEX,
        get_cosine_schedule_with_floor,
        loss_step,
        optimizer_step,
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if warmup_steps is None:
        warmup_steps = max(1, round(WARMUP_FRACTION * steps)) if steps else 0
    schedule = get_cosine_schedule_with_floor(optimizer, warmup_steps, max(steps, 1), min_lr_ratio)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    model.train()
    losses: list[float] = []
    for batch in batches:
        batch_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        loss = loss_step(model, loss_fn, batch)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss = loss * batch_tokens
        loss.backward()
        optimizer_step(model, params, optimizer, schedule, loss.detach(), batch_tokens)
    model.eval()
    return losses


def perplexity(model: nn.Module, batches: list[Batch]) -> float:
    """Perplexity over the labelled tokens of ``batches`` (``nan`` if it diverged)."""
    from qalora_tune.recipe_utils import evaluate_lm

    loss = evaluate_lm(model, batches, torch.device("cpu"))["loss"]
    return math.exp(loss) if math.isfinite(loss) and loss < 80 else math.nan


# ------------------------------------------------------------------------- models


class Models:
    """Builds every model of the benchmark from the checkpoint's fp32 weights."""

    def __init__(self, args: argparse.Namespace):
        from qalora_tune.checkpointing import QALoRACheckpointer
        from qalora_tune.recipe_utils import load_full_precision

        checkpointer = QALoRACheckpointer(
            str(args.shared / MODEL_SUBDIR), "LLAMA2", output_dir=tempfile.gettempdir()
        )
        model, _ = load_full_precision(
            BUILDER, checkpointer, torch.device("cpu"), torch.float32, otherwise="--shared"
        )
        self.base_state: State = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._gptq_bases: dict[tuple[str, int, int], State] = {}
        self.nf4_scaler_blocks: dict[str, int] = {}
        self.storage: dict[str, str] = {}

    @staticmethod
    def _builder() -> Callable[..., nn.Module]:
        from qalora_tune.models import qalora_tinystories656k

        return qalora_tinystories656k

    def full_precision(self, state: State | None = None) -> nn.Module:
        """The fp32 model with ``state`` (default: the checkpoint) loaded, frozen."""
        model = self._builder().full_precision()
        model.load_state_dict(self.base_state if state is None else state)
        model.requires_grad_(False)
        return model.eval()

    # ---------------------------------------------------------------- quantized bases

    def gptq_state(self, state: State, bits: int, group_size: int, target: TargetData) -> State:
        """Sequential GPTQ of the fp32 model ``state``, calibrated on the target's
        training split; returns the int state dict."""
        from qalora_tune.quantization import calibrate_gptq

        return calibrate_gptq(
            self.full_precision(state),
            target.calibration,
            group_size=group_size,
            bits=bits,
            dtype=torch.float32,
        )

    def base_gptq_state(self, bits: int, group_size: int, target: TargetData) -> State:
        """The checkpoint's GPTQ state for a target (cached)."""
        key = (target.name, bits, group_size)
        if key not in self._gptq_bases:
            self._gptq_bases[key] = self.gptq_state(self.base_state, bits, group_size, target)
        return self._gptq_bases[key]

    def quantized(
        self, state: State | None, bits: int, group_size: int, quantizer: str, target: TargetData
    ) -> nn.Module:
        """Every linear of the fp32 model ``state`` (default: the checkpoint) quantized to
        ``bits`` with groups of ``group_size`` by ``quantizer``; no adapters."""
        from qalora_tune.quantization.gptq_calibration import load_quantized_base

        model = self._builder()([], group_size=group_size, quantizer=quantizer, bits=bits)
        load_quantized_base(
            model, self._quantized_state(state, bits, group_size, quantizer, target)
        )
        self._record_storage(model, group_size)
        return model.eval()

    def _quantized_state(
        self, state: State | None, bits: int, group_size: int, quantizer: str, target: TargetData
    ) -> State:
        if quantizer != "gptq":
            return self.base_state if state is None else state  # quantized as it loads
        if state is None:
            return self.base_gptq_state(bits, group_size, target)
        return self.gptq_state(state, bits, group_size, target)

    def _record_storage(self, model: nn.Module, group_size: int) -> None:
        weight = model.layers[0].attn.q_proj.weight
        self.storage[str(group_size)] = type(weight).__name__

    # ---------------------------------------------------------------- QA-LoRA

    def qalora(
        self,
        bits: int,
        group_size: int,
        quantizer: str,
        alpha: float,
        seed: int,
        target: TargetData,
        legacy_mean: bool = True,
    ) -> nn.Module:
        """The project's QA-LoRA model on the int-b base, adapters initialised with ``seed``;
        with ``legacy_mean`` its layers mean-pool (this benchmark's tuned rows), else they
        keep the builders' pooling and initialisation (the packaged defaults' row)."""
        from qalora_tune.quantization.gptq_calibration import load_quantized_base

        torch.manual_seed(seed)
        model = self._builder()(
            ATTENTION_TARGETS,
            apply_lora_to_mlp=True,
            lora_rank=RANK,
            lora_alpha=alpha,
            lora_dropout=0.0,
            group_size=group_size,
            quantizer=quantizer,
            bits=bits,
        )
        load_quantized_base(model, self._quantized_state(None, bits, group_size, quantizer, target))
        if not legacy_mean:
            return model
        # this benchmark's "mean"/"sum" rows are alphas on a mean-pooled layer (qalora_alpha):
        # the layers' earlier convention, A drawn again in it (the builders now sum)
        from qalora_tune.modules import QALoRALinear

        for module in model.modules():
            if isinstance(module, QALoRALinear):
                module.pooling = "mean"
                module.initialize_parameters()
        return model

    # ---------------------------------------------------------------- LoRA / QLoRA

    def lora(self, seed: int, nf4: bool) -> nn.Module:
        """torchtune ``LoRALinear`` on every adapter target of the fp32 model; with
        ``nf4`` over a torchao NF4 base (QLoRA)."""
        from torchao.dtypes import to_nf4
        from torchtune.modules.peft import LoRALinear

        from qalora_tune.models import MLP_PROJECTIONS

        torch.manual_seed(seed)
        model = self.full_precision()
        targets = set(ATTENTION_TARGETS) | set(MLP_PROJECTIONS)
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if name not in targets or not isinstance(child, nn.Linear):
                    continue
                weight = child.weight.detach()
                kwargs = {}
                if nf4:
                    kwargs = {
                        "block_size": NF4_BLOCK_SIZE,
                        "scaler_block_size": nf4_scaler_block_size(weight.numel()),
                    }
                    self.nf4_scaler_blocks[f"{parent_name}.{name}"] = kwargs["scaler_block_size"]
                layer = LoRALinear(
                    child.in_features,
                    child.out_features,
                    rank=RANK,
                    alpha=ALPHA,
                    quantize_base=nf4,
                    **kwargs,
                )
                base = to_nf4(weight, **kwargs) if nf4 else weight.clone()
                layer.weight = nn.Parameter(base, requires_grad=False)
                setattr(parent, name, layer)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        return model

    @staticmethod
    @torch.no_grad()
    def merged_lora_state(model: nn.Module) -> State:
        """The fp32 state dict of a (Q)LoRA model with its adapters merged (NF4 bases
        dequantized first)."""
        from torchao.dtypes.nf4tensor import NF4Tensor
        from torchtune.modules.peft import get_merged_lora_ckpt

        state = {
            key: (value.get_original_weight() if isinstance(value, NF4Tensor) else value)
            .detach()
            .clone()
            for key, value in model.state_dict().items()
        }
        return get_merged_lora_ckpt(state, rank=RANK, alpha=ALPHA)


def adapter_state(model: nn.Module) -> State:
    """A copy of the trainable adapter weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def merge_all(model: nn.Module) -> int:
    """Merge every ``QALoRALinear`` of ``model``; returns how many."""
    from qalora_tune.modules import QALoRALinear

    layers = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    for layer in layers:
        layer.merge()
    return len(layers)

