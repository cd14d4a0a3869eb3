"""The memory bounds of ``benchmarks/real_size.py`` (its module notes list them): what a
shape's QA-LoRA model holds, from its sizes, and each bound checked on a run's results."""

from typing import Any, Dict, List

import _real_shapes

GB = 1e9
ALLOWANCE = 1.5e9
LOADER_RATIO = 1.2
# the block buffers of a layer's conversion (a few of BLOCK_BYTES = 16 MB) and the merge
# report's probe forward: fixed, whatever the model's size
WORKING_BUFFERS = 64e6
IN_FLIGHT_LAYERS = 3


def check_bounds(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each memory bound of the module notes: its measured value, its limit, whether held."""
    phases, bounds = results["phases"], []
    # the int4 model as trained (CPU kernel layout, 4.5 bits at G=64); the merged files
    # may be larger (the default CPU format, intx, keeps a byte per code)
    model = results.get("int4_model_bytes") or results.get("merged_file_bytes")
    files = results.get("merged_file_bytes")
    finetune = phases.get("finetune", {})
    if model and "load_peak_rss_bytes" in finetune and "largest_tensor_bytes" in results:
        limit = model + results["largest_tensor_bytes"] + ALLOWANCE
        bounds.append(_bound("load + quantize", finetune["load_peak_rss_bytes"], limit,
                             "model + largest bf16 tensor + 1.5 GB"))
    if model and "train_peak_rss_bytes" in finetune:
        # adapters in bf16: weights, gradients and AdamW's two moments
        limit = model + 4 * results.get("adapter_bytes", 0) + ALLOWANCE
        bounds.append(_bound("training", finetune["train_peak_rss_bytes"], limit,
                             "model + adapter, gradient and AdamW state + 1.5 GB"))
        train = finetune["train_peak_rss_bytes"]
        # one merged layer in flight, counted three times: the layer as written, its int4
        # plain repacking on the way to intx (half of it) and a row block, and what the
        # allocator has not handed back of the previous layer. Measured on Llama-2-7B
        # widths, 2 layers, intx: 165 MB above training, of which the conversion's own
        # allocations are about 90 MB; before the block-wise intx export it was 680 MB.
        in_flight = IN_FLIGHT_LAYERS * results.get("largest_quantized_layer_bytes", 0) + WORKING_BUFFERS
        if "save_peak_rss_bytes" in finetune:
            bounds.append(_bound("merge + export (in training)", finetune["save_peak_rss_bytes"],
                                 train + in_flight,
                                 "training peak + 3 x the largest merged layer + 64 MB"))
        if "merge" in phases:  # it loads the base too: compared with the fine-tuning's load
            limit = max(finetune.get("load_peak_rss_bytes", 0), train) + in_flight
            bounds.append(_bound("qalora_merge (load, merge, export)",
                                 phases["merge"]["peak_rss_bytes"], limit,
                                 "fine-tuning's load or training peak + 3 x the largest merged layer + 64 MB"))
    for loader in ("load_merged", "transformers"):
        if files and loader in phases:
            phase = phases[loader]
            layer = IN_FLIGHT_LAYERS * results.get("largest_quantized_layer_bytes", 0)
            bounds.append(_bound(f"{loader} (load + first forward)",
                                 phase["peak_rss_bytes"] - phase["rss_after_import_bytes"],
                                 LOADER_RATIO * files + layer,
                                 "1.2 x merged files + 3 x the largest merged layer, above the imports"))
    return bounds


def _bound(name: str, value: float, limit: float, rule: str) -> Dict[str, Any]:
    return {"bound": name, "measured_bytes": value, "limit_bytes": limit, "rule": rule,
            "holds": bool(value <= limit)}


def model_bytes(config: Dict[str, Any], group_size: int = 64, rank: int = 16) -> Dict[str, int]:
    """What a shape's QA-LoRA model holds, from its sizes (the packaged configs' settings:
    int4 linears at group size 64 with bf16 scales and zero points, bf16 embeddings and
    norms, rank-16 adapters on every projection): the bytes of the model (as merged),
    of its checkpoint in bf16, of its largest bf16 tensor and of its adapters."""
    linear, dense, largest, adapters = 0, 0, 0, 0
    for name, shape in _real_shapes.hf_tensor_shapes(config):
        count = 1
        for size in shape:
            count *= size
        largest = max(largest, 2 * count)
        if len(shape) == 2 and "embed_tokens" not in name:
            linear += count
            if "lm_head" not in name:  # no adapter on the output projection
                adapters += rank * (shape[1] // group_size + shape[0])  # A (r, K/G), B (N, r)
        else:
            dense += count
    return {
        "model": int(linear * (0.5 + 4 / group_size) + 2 * dense),
        "checkpoint": 2 * (linear + dense),
        "largest_tensor": largest,
        "adapters": 2 * adapters,
    }
