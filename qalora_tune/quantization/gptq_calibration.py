"""Sequential GPTQ of a whole torchtune decoder, calibrated on token sequences.

GPTQ (see :mod:`qalora_tune.quantization.gptq`) needs the inputs each linear sees. As in
the paper, the decoder is quantized one layer at a time, each layer calibrated on the
outputs of the layers before it *after* those were quantized, so later layers learn to
compensate the error of earlier ones::

    h = tok_embeddings(tokens)
    for layer in layers:
        H[linear] = 2 X^T X / n    for every linear of the layer (hooked inputs, from h)
        W[linear] <- dequantize(quantize_gptq(W[linear], H[linear]))
        h = layer(h)               # with the quantized weights: the next layer's inputs
    output (if untied): calibrated on norm(h)

Linears that share their input (``q_proj``/``k_proj``/``v_proj``, ``w1``/``w3``) share one
Hessian. The result is a state dict whose linear weights are torchao int4 tensors (which
:class:`~qalora_tune.modules.QuantizedLinear`'s load hook accepts unchanged) and whose other
entries (embeddings, norms) are the full-precision model's.

Memory: the whole full-precision model is resident during calibration, plus the hidden
states of all calibration sequences (``num_samples x seq_len x embed_dim``) and one
float64 Hessian ``in_dim x in_dim`` per distinct linear input of the current layer. A
variant that streams the checkpoint layer by layer is future work.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from qalora_tune._progress import progress_bar
from qalora_tune.errors import UserValueError
from qalora_tune.quantization.base_weight import to_base
from qalora_tune.quantization.gptq import HessianAccumulator, quantize_gptq
from qalora_tune.quantization.group_quant import GroupQuantizedWeight

__all__ = ["calibrate_gptq", "load_quantized_base", "sample_calibration_sequences"]


def sample_calibration_sequences(
    dataset: Sequence, num_samples: int, max_seq_len: Optional[int] = None, seed: int = 0
) -> List[torch.Tensor]:
    """Draw ``num_samples`` token sequences from a tokenized dataset, reproducibly.

    Args:
        dataset (Sequence): examples with a ``"tokens"`` list (torchtune's datasets).
        num_samples (int): how many examples to draw (all of them if fewer exist).
        max_seq_len (int, optional): truncate each sequence to this many tokens.
        seed (int): seed of the draw; the same seed and dataset give the same sequences.

    Returns:
        List[torch.Tensor]: 1D int64 token tensors, in drawing order.

    Raises:
        ValueError: if ``num_samples`` or ``max_seq_len`` is not positive, or the dataset
            is empty.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserValueError(f"calibration.num_samples must be a positive integer, got {num_samples!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise UserValueError(
            f"calibration.max_seq_len must be a positive integer or null, got {max_seq_len!r}"
        )
    if len(dataset) == 0:
        raise UserValueError("the calibration dataset is empty; set calibration.dataset to some text")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    sequences = []
    for index in order[:num_samples].tolist():
        tokens = torch.as_tensor(dataset[index]["tokens"], dtype=torch.long)
        sequences.append(tokens[:max_seq_len] if max_seq_len is not None else tokens)
    return sequences


def _batches(
    sequences: Sequence[torch.Tensor], batch_size: int, device: torch.device
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(tokens, mask)`` batches of shape ``(B, S)``; ``mask`` marks real tokens."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserValueError(f"calibration.batch_size must be a positive integer, got {batch_size!r}")
    if not sequences or any(s.numel() == 0 for s in sequences):
        raise UserValueError("GPTQ needs calibration sequences, none of them empty")
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(s.numel() for s in chunk)
        tokens = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.bool)
        for row, seq in enumerate(chunk):
            tokens[row, : seq.numel()] = seq
            mask[row, : seq.numel()] = True
        batches.append((tokens.to(device), mask.to(device)))
    return batches


class _InputHessians:
    """Forward pre-hooks that accumulate each linear's input Hessian over real tokens.

    Linears called on the very same input tensor one after the other share an accumulator.
    """

    def __init__(self, linears: Dict[str, nn.Linear]):
        self.mask: Optional[torch.Tensor] = None
        self.owner: Dict[str, str] = {}
        self.accumulators: Dict[str, HessianAccumulator] = {}
        self._last: Optional[Tuple[torch.Tensor, str]] = None
        self._handles = [
            linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Linear, args: Tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if name not in self.owner:
                if self._last is not None and self._last[0] is x:
                    self.owner[name] = self.owner[self._last[1]]
                else:
                    self.owner[name] = name
                    self.accumulators[name] = HessianAccumulator(module.in_features)
            self._last = (x, name)
            if self.owner[name] == name:
                rows = x[self.mask] if self.mask is not None and x.shape[:-1] == self.mask.shape else x
                self.accumulators[name].add(rows)

        return hook

    def matrix(self, name: str) -> torch.Tensor:
        return self.accumulators[self.owner[name]].matrix()

    def end_batch(self) -> None:
        self._last = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _linears(module: nn.Module, prefix: str) -> Dict[str, nn.Linear]:
    return {
        f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, nn.Linear)
    }


@torch.no_grad()
def _quantize_linear(
    linear: nn.Linear,
    hessian: torch.Tensor,
    group_size: int,
    bits: int,
    damp: float,
    block_size: int,
) -> GroupQuantizedWeight:
    """GPTQ of one linear (zero columns pad ``in_dim`` to a multiple of ``group_size``:
    inputs that never fire, so they quantize freely); its weight becomes the dequantized
    one, for the layers calibrated after it."""
    weight = linear.weight.detach()
    in_dim = weight.shape[1]
    extra = -in_dim % group_size
    gq = quantize_gptq(
        F.pad(weight, (0, extra)),
        group_size,
        bits,
        F.pad(hessian, (0, extra, 0, extra)),
        damp=damp,
        block_size=block_size,
    )
    linear.weight.copy_(gq.dequantize(torch.float32)[:, :in_dim].to(weight.dtype))
    return gq


@torch.no_grad()
def calibrate_gptq(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    group_size: int,
    bits: int = 4,
    damp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 8,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Quantize every linear of a full-precision torchtune decoder with sequential GPTQ.

    ``model`` is modified in place (and put in eval mode): its linear weights end up
    dequantized (what the int4 base computes), so it can be compared with the int4 model
    and then dropped.

    Args:
        model (nn.Module): a full-precision ``TransformerDecoder`` (``tok_embeddings``,
            ``layers``, ``norm``, ``output``) with its weights loaded, e.g.
            ``builder.full_precision()`` loaded through the checkpointer.
        sequences (Sequence[torch.Tensor]): 1D token tensors to calibrate on (see
            :func:`sample_calibration_sequences`); batches are right-padded and padding
            never enters a Hessian.
        group_size (int): quantization group size (``model.group_size``).
        bits (int): bit width of the grid (``model.bits``).
        damp (float): GPTQ's diagonal dampening, as a fraction of the mean diagonal.
        block_size (int): GPTQ's lazy-update block of columns.
        batch_size (int): calibration sequences per forward.
        dtype (torch.dtype, optional): dtype of the int4 tensors' scales and zeros (the
            QA-LoRA model's); the model's own by default.

    Returns:
        Dict[str, torch.Tensor]: the model's state dict (torchtune keys) with every linear
        weight a torchao int4 tensor on the model's device, ready for
        :func:`load_quantized_base`.

    Raises:
        ValueError: for a model without the decoder layout, a linear outside the decoder
            layers and an untied output projection, or empty calibration data.
    """
    for part in ("tok_embeddings", "layers", "norm"):
        if not hasattr(model, part):
            raise UserValueError(
                f"GPTQ calibration expects a torchtune TransformerDecoder; the model has no "
                f"{part!r}"
            )
    embedding = model.tok_embeddings.weight
    device, dtype = embedding.device, dtype or embedding.dtype
    covered = {f"layers.{i}.{n}" for i, layer in enumerate(model.layers) for n in _linears(layer, "")}
    output = getattr(model, "output", None)
    if isinstance(output, nn.Linear):
        covered.add("output")
    stray = sorted(set(_linears(model, "")) - covered)
    if stray:
        raise UserValueError(f"GPTQ calibration does not know where the inputs of {stray} come from")

    model.eval()
    batches = _batches(sequences, batch_size, device)
    hidden = [model.tok_embeddings(tokens) for tokens, _ in batches]
    quantized: Dict[str, GroupQuantizedWeight] = {}

    def calibrate(
        module: nn.Module, prefix: str, hidden: List[torch.Tensor], outputs: bool = True
    ) -> List[torch.Tensor]:
        """GPTQ of ``module``'s linears on its inputs ``hidden``; then (if ``outputs``) its
        outputs with the quantized weights, the next module's inputs."""
        linears = _linears(module, prefix)
        hessians = _InputHessians(linears)
        try:
            for h, (_, mask) in zip(hidden, batches):
                hessians.mask = mask
                module(h)
                hessians.end_batch()
        finally:
            hessians.remove()
        for name, linear in linears.items():
            quantized[name] = _quantize_linear(
                linear, hessians.matrix(name), group_size, bits, damp, block_size
            )
        return [module(h) for h in hidden] if outputs else []

    steps = len(model.layers) + isinstance(output, nn.Linear)
    with progress_bar(steps, "GPTQ calibration", unit="layer") as bar:
        for i, layer in enumerate(model.layers):
            hidden = calibrate(layer, f"layers.{i}.", hidden)
            bar.update()
        if isinstance(output, nn.Linear):
            hidden = [model.norm(h) for h in hidden]
            calibrate(output, "output", hidden, outputs=False)
            bar.update()
    del hidden

    state = {}
    for key, value in model.state_dict().items():
        owner = key.removesuffix(".weight")
        if key.endswith(".weight") and owner in quantized:
            state[key] = to_base(quantized[owner], device=device, dtype=dtype)
        else:
            state[key] = value
    return state


def load_quantized_base(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a :func:`calibrate_gptq` state dict into a QA-LoRA model (adapters untouched).

    Raises:
        ValueError: if the state dict lacks a base weight of the model or has extra keys.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if "lora_" not in k]
    if missing or result.unexpected_keys:
        raise UserValueError(
            f"the calibrated base does not fit the model: missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}; build both from the same model builder"
        )
