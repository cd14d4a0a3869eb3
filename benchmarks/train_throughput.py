"""Training tokens/s and peak memory: QA-LoRA vs torchtune's LoRA and QLoRA, side by side.

    python benchmarks/train_throughput.py                                  # CPU defaults
    python benchmarks/train_throughput.py --shape tinystories656K
    python benchmarks/train_throughput.py --device cuda --layers 32        # full llama2-7B

One training step (forward, cross-entropy, backward, AdamW step) on the same model
shapes, batch, sequence length and adapter targets (q, k, v, output projections and the
MLP) for each method:

    qalora_{fp32,bf16}  this project: int4 base (torchao), pooled adapters, in that dtype
    qalora_dq_{fp32,bf16}  the same with the base's scales in 8 bits
                        (``double_quant_scales=True``)
    lora_{fp32,bf16}    torchtune ``lora_llama2``: dense base and adapters in that dtype
    qlora_{fp32,bf16}   torchtune ``lora_llama2(quantize_base=True)``: NF4 base, the rest
                        (and NF4's dequantized weight) in that dtype
    qalora_chunked_{fp32,bf16}  (only when named in ``--methods``) ``qalora_*`` with the
                        native CPU int4 GEMM switched off (``QALORA_TUNE_NATIVE_INT4=0``
                        during its steps): the chunked dequantize + BLAS path it replaced,
                        timed in the same process, interleaved

The fp32 variants are CPU references (the CPU int4 kernel is a bf16 kernel; in fp32
QA-LoRA dequantizes cache-sized chunks for BLAS, see ``qalora_tune/ops``).

Throughput: all models are built in one process and their steps are interleaved
(``qalora, lora_fp32, ..., qalora, lora_fp32, ...``), so slow phases of a shared machine
hit every method alike; the median over repeats is reported, with ratios. Peak memory: on
CUDA ``max_memory_allocated`` around each method's steps; on CPU each method runs alone
in a child process that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
before building the model and again before training, and reports both peaks (``VmHWM``)
above the RSS before the build.

Shapes: ``llama2_7b_layers`` is Llama-2-7B's decoder layer (dim 4096, MLP 11008, 32
heads) repeated ``--layers`` times with random weights, vocab ``--vocab``;
``llama3_2_1b_layers`` the same with Llama-3.2-1B's widths (dim 2048, MLP 8192, 32 heads,
8 KV heads; built by torchtune's Llama 2 builder, whose RoPE differs, which does not change
the work of a step);
``tinystories656K`` is the real checkpoint in ``../shared/models`` (output tied to the
embeddings, group size 32).

Where the time goes: one extra profiled step per method (``torch.profiler``), each
operator's own CPU time put in one category: the int4 base's products (BLAS GEMMs on
dequantized chunks, the chunks' dequantization, copies, and the int4 ops' own time, which
is the native kernel where it runs), the pooled adapter, attention, other GEMMs (all of
LoRA's and QLoRA's products), other copies and the rest (norms, activations, loss,
optimizer).

Base bits per weight: the bytes the frozen linear weights of the decoder layers hold
(codes, scales, zero points, NF4 block scalers), times 8, over their logical number of
weights.

Output: a markdown table on stdout, ``--json`` with every number, ``--markdown`` with
the table.
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from _report import command_line, cpu_model_name, write_outputs
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
METHODS = (
    "qalora_fp32", "qalora_bf16", "qalora_dq_fp32", "qalora_dq_bf16",
    "lora_fp32", "lora_bf16", "qlora_fp32", "qlora_bf16",
)
# A/B methods: qalora_* with the native CPU int4 GEMM off, run only when asked for
EXTRA_METHODS = ("qalora_chunked_fp32", "qalora_chunked_bf16")
NATIVE_SWITCH = "QALORA_TUNE_NATIVE_INT4"
ADAPTER_TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QLORA_TINYSTORIES_REASON = (
    "torchtune's NF4 base cannot hold this model: to_nf4 needs numel/64 divisible by 256 "
    "(the scaler block size), and k_proj/v_proj (64 x 128) have 128 scalers"
)

LLAMA2_7B_LAYER = dict(num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008)
# Llama-3.2-1B's widths (grouped-query attention, 8 KV heads), 16 layers in the real model
LLAMA3_2_1B_LAYER = dict(num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192)
LAYERS_ON_CUDA = {"llama2_7b_layers": 32, "llama3_2_1b_layers": 16}
TINY = dict(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=256,
            intermediate_dim=512)


# ---------------------------------------------------------------------------- models


def _shape_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    if args.shape == "llama2_7b_layers":
        dims = dict(LLAMA2_7B_LAYER, vocab_size=args.vocab, num_layers=args.layers)
    elif args.shape == "llama3_2_1b_layers":
        dims = dict(LLAMA3_2_1B_LAYER, vocab_size=args.vocab, num_layers=args.layers)
    elif args.shape == "tinystories656K":
        from qalora_tune.models import qalora_tinystories656k

        dims = dict(qalora_tinystories656k.full_precision.keywords)  # the real model's sizes
    else:
        dims = dict(TINY)
    return dict(dims, max_seq_len=max(512, args.seq_len))


def _tied(shape: str) -> bool:
    return shape == "tinystories656K"


def _full_precision_state(args: argparse.Namespace) -> Optional[Dict[str, torch.Tensor]]:
    """The real checkpoint's weights as a torchtune state dict (``None``: random weights)."""
    if args.shape != "tinystories656K":
        return None
    from qalora_tune.checkpointing import QALoRACheckpointer
    from qalora_tune.models import qalora_tinystories656k

    checkpoint_dir = SHARED_MODELS / "tinystories656K"
    if not checkpoint_dir.is_dir():
        raise SystemExit(f"train_throughput: error: {checkpoint_dir} not found (../shared)")
    model = qalora_tinystories656k.full_precision()
    QALoRACheckpointer(str(checkpoint_dir), "LLAMA2", output_dir="/tmp").load_base(model)
    return model.state_dict()


def _torchtune_lora(args: argparse.Namespace, quantize_base: bool, dtype: torch.dtype) -> nn.Module:
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules import TiedLinear

    dims = _shape_kwargs(args)
    with torch.device(args.device):
        model = lora_llama2(
            lora_attn_modules=ADAPTER_TARGETS,
            apply_lora_to_mlp=True,
            apply_lora_to_output=False,
            lora_rank=args.rank,
            lora_alpha=2 * args.rank,
            quantize_base=quantize_base,
            **dims,
        )
    if _tied(args.shape):
        del model.output
        model.output = TiedLinear(model.tok_embeddings)
    model.to(dtype)  # NF4 weights keep their 4-bit storage and dequantize to this dtype
    return model


def _qalora(args: argparse.Namespace, dtype: torch.dtype, double_quant: bool) -> nn.Module:
    from torchtune.models.llama2 import llama2
    from torchtune.training import set_default_dtype

    from qalora_tune.models import qalora_transformer, tied_llama

    dims = _shape_kwargs(args)
    base = partial(tied_llama if _tied(args.shape) else llama2, **dims)
    with set_default_dtype(dtype), torch.device(args.device):
        return qalora_transformer(
            base, ADAPTER_TARGETS, apply_lora_to_mlp=True, lora_rank=args.rank,
            lora_alpha=2 * args.rank, group_size=args.group_size,
            double_quant_scales=double_quant,
        )


def build(method: str, args: argparse.Namespace, state: Optional[Dict[str, torch.Tensor]]) -> nn.Module:
    """One method's model with only its adapters trainable (the base weights of ``state``)."""
    if method not in METHODS + EXTRA_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + EXTRA_METHODS}")
    kind, dtype_name = method.rsplit("_", 1)
    dtype = DTYPES[dtype_name]
    if kind.startswith("qalora"):
        model = _qalora(args, dtype, double_quant=kind == "qalora_dq")
    else:
        model = _torchtune_lora(args, quantize_base=kind == "qlora", dtype=dtype)
    if state is not None:
        model.load_state_dict(state, strict=False)  # adapters stay at their init
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


# ---------------------------------------------------------------------------- steps


class Trainer:
    """One method's model, optimizer and fixed batch; :meth:`step` runs one training step."""

    def __init__(self, method: str, args: argparse.Namespace, state: Optional[Dict[str, torch.Tensor]]):
        self.method = method
        self.device = torch.device(args.device)
        self.model = build(method, args, state)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        vocab = _shape_kwargs(args)["vocab_size"]
        generator = torch.Generator().manual_seed(args.seed)
        self.tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator)
        self.tokens = self.tokens.to(self.device)
        self.losses: List[float] = []

    def step(self) -> None:
        if not self.method.startswith("qalora_chunked"):
            return self._step()
        previous = os.environ.get(NATIVE_SWITCH)
        os.environ[NATIVE_SWITCH] = "0"
        try:
            self._step()
        finally:
            if previous is None:
                del os.environ[NATIVE_SWITCH]
            else:
                os.environ[NATIVE_SWITCH] = previous

    def _step(self) -> None:
        logits = self.model(self.tokens[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.float().flatten(0, 1), self.tokens[:, 1:].flatten()
        )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())  # .item() also waits for the device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(trainers: List[Trainer], args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    tokens_per_step = args.batch_size * args.seq_len
    seconds: Dict[str, List[float]] = {t.method: [] for t in trainers}
    peaks: Dict[str, int] = {}
    for trainer in trainers:
        for _ in range(args.warmup):
            trainer.step()
    for _ in range(args.repeats):
        for trainer in trainers:
            if trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.device)
            _sync(trainer.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.step()
            _sync(trainer.device)
            seconds[trainer.method].append((time.perf_counter() - start) / args.steps)
            if trainer.device.type == "cuda":
                peaks[trainer.method] = max(
                    peaks.get(trainer.method, 0), torch.cuda.max_memory_allocated(trainer.device)
                )
    results = {}
    for trainer in trainers:
        median = statistics.median(seconds[trainer.method])
        results[trainer.method] = {
            "seconds_per_step": seconds[trainer.method],
            "median_seconds_per_step": median,
            "tokens_per_s": tokens_per_step / median,
            "trainable_params": trainer.trainable,
            "model_mib": {k: v / 2**20 for k, v in model_bytes(trainer.model).items()},
            "base_bits_per_weight": frozen_linear_bits_per_weight(trainer.model),
            "final_loss": trainer.losses[-1],
        }
        if trainer.method in peaks:
            results[trainer.method]["peak_cuda_allocated_mib"] = peaks[trainer.method] / 2**20
    return results


_BASE_OPS = ("qalora_tune::int4_linear", "qalora_tune::int4_dq_linear",
             "qalora_tune::int4_linear_grad_input", "qalora_tune::intx_linear",
             "qalora_tune::intx_linear_grad_input")
_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm_for_cpu",
          "aten::_weight_int4pack_mm")
_COPIES = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous",
           "aten::constant_pad_nd", "aten::cat")
BREAKDOWN_CATEGORIES = (
    "base: BLAS GEMM on dequantized chunks", "base: chunk dequantization",
    "base: copies", "base: int4 ops' own time (native kernel / chunk loop)",
    "pooled adapter", "attention", "other GEMMs", "other copies", "other",
)


def _region(event) -> Optional[str]:
    """The region an event runs in: the int4 base, the pooled adapter or attention."""
    while event is not None:
        name = event.name
        if name in _BASE_OPS or name.startswith("GeneratedBackwardFor_qalora_tune_int4") \
                or name.startswith("GeneratedBackwardFor_qalora_tune_intx"):
            return "base"
        if "pooled_lora" in name:
            return "pooled adapter"
        if "scaled_dot_product" in name:
            return "attention"
        event = event.cpu_parent
    return None


def _category(event) -> str:
    region, name = _region(event), event.name
    if region == "base":
        if name in _GEMMS:
            return "base: BLAS GEMM on dequantized chunks"
        if name in _COPIES:
            return "base: copies"
        if name in _BASE_OPS or name.startswith("GeneratedBackwardFor"):
            return "base: int4 ops' own time (native kernel / chunk loop)"
        return "base: chunk dequantization"  # compiled chunk kernels and the eager passes
    if region is not None:
        return region
    if name in _GEMMS or name in ("aten::linear", "aten::matmul"):
        return "other GEMMs"
    if name in _COPIES:
        return "other copies"
    return "other"


def step_breakdown(trainer: Trainer) -> Dict[str, float]:
    """Milliseconds of one profiled training step per category (``BREAKDOWN_CATEGORIES``)
    and ``step``, the step's CPU time: each operator's own (self) CPU time counted once,
    in the category of the region it runs in and of its name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("train_step"):
            trainer.step()
    totals = {category: 0.0 for category in BREAKDOWN_CATEGORIES}
    step = 0.0
    for event in prof.events():
        if event.name == "train_step":
            step = event.cpu_time_total / 1e3
        elif event.device_type == torch.autograd.DeviceType.CPU:
            totals[_category(event)] += event.self_cpu_time_total / 1e3
    return dict(totals, step=step)


# ---------------------------------------------------------------------------- CPU memory


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _warm_up_runtime(args: argparse.Namespace) -> None:
    """One step of a small model first: thread pools and allocator arenas then exist
    before the peak is reset, and do not count against the method measured."""
    small = argparse.Namespace(**dict(vars(args), shape="tiny", rank=4, group_size=64))
    Trainer("lora_fp32", small, None).step()


def model_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the frozen weights and of the trainable adapters."""
    from qalora_tune.models import tensor_nbytes

    sizes = {"frozen": 0, "adapters": 0}
    for param in model.parameters():
        sizes["adapters" if param.requires_grad else "frozen"] += tensor_nbytes(param)
    for buffer in model.buffers():
        sizes["frozen"] += tensor_nbytes(buffer)
    return sizes


def frozen_linear_bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight of the frozen linear weights in the decoder layers, for any
    method's model (``qalora_tune.models.base_bits_per_weight`` counts only int4 bases)."""
    from qalora_tune.models import tensor_nbytes

    bits, weights = 0, 0
    for name, param in model.named_parameters():
        if name.startswith("layers.") and name.endswith("weight") and param.dim() == 2:
            if not param.requires_grad:
                bits += 8 * tensor_nbytes(param)
                weights += param.numel()
    return bits / weights


def _reset_peak_rss() -> None:
    # hand freed heap pages back first (glibc keeps them mapped), so the RSS the peak
    # restarts from is the live memory, not what earlier transients left behind
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: the peak RSS (VmHWM) restarts from the current RSS


def memory_worker(args: argparse.Namespace) -> None:
    """Child process: one method's peak RSS while building, and while training, as JSON.

    The kernel's peak counter is reset before the build and again before the
    ``--warmup + --steps`` training steps; both peaks are reported above the RSS before
    the build (the loaded checkpoint and the warmed-up runtime are not counted).
    """
    state = _full_precision_state(args)
    _warm_up_runtime(args)
    _reset_peak_rss()
    before = _status_mib("VmRSS")
    trainer = Trainer(args.memory_worker, args, state)
    build_peak = _status_mib("VmHWM")
    _reset_peak_rss()
    built = _status_mib("VmRSS")
    for _ in range(args.warmup + args.steps):
        trainer.step()
    train_peak = _status_mib("VmHWM")
    print(json.dumps({
        "rss_before_build_mib": before,
        "model_rss_mib": built - before,
        "model_tensor_mib": sum(model_bytes(trainer.model).values()) / 2**20,
        "build_peak_mib": build_peak - before,
        "train_peak_mib": train_peak - before,
    }))


def measure_cpu_memory(methods: List[str], argv: List[str]) -> Dict[str, Dict[str, float]]:
    results = {}
    for method in methods:
        command = [sys.executable, __file__, *argv, "--memory-worker", method]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"train_throughput: memory run of {method} failed:\n{done.stderr[-2000:]}")
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ---------------------------------------------------------------------------- report


def environment(args: argparse.Namespace) -> Dict[str, Any]:
    import torchao
    import torchtune

    cpu = cpu_model_name()
    env = {
        "torch": torch.__version__, "torchao": torchao.__version__,
        "torchtune": torchtune.__version__, "cpu": cpu, "threads": torch.get_num_threads(),
        "command": command_line("benchmarks/train_throughput.py", sys.argv[1:]),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown_table(report: Dict[str, Any]) -> str:
    results = report["results"]
    reference = {
        m: results[m]["tokens_per_s"]
        for m in ("qlora_fp32", "qlora_bf16", "lora_fp32", "lora_bf16")
        if m in results
    }
    head = ["method", "tokens/s", "s/step"] + [f"vs {m}" for m in reference]
    head += [f"vs {m}" for m in results if m.startswith("qalora_chunked")]
    head += ["peak training memory (MiB)", "base bits/weight"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, numbers in results.items():
        memory = report.get("memory", {}).get(method, {})
        peak = numbers.get("peak_cuda_allocated_mib", memory.get("train_peak_mib"))
        row = [method, f"{numbers['tokens_per_s']:.1f}", f"{numbers['median_seconds_per_step']:.3f}"]
        row += [f"{numbers['tokens_per_s'] / value:.2f}x" for value in reference.values()]
        row += [f"{numbers['tokens_per_s'] / results[m]['tokens_per_s']:.2f}x"
                for m in results if m.startswith("qalora_chunked")]
        row.append("-" if peak is None else f"{peak:.0f}")
        row.append(f"{numbers['base_bits_per_weight']:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def breakdown_table(breakdown: Dict[str, Dict[str, float]]) -> str:
    """Where one step's CPU time goes, in ms per category, one column per method."""
    methods = list(breakdown)
    lines = ["| ms in one profiled step | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for category in BREAKDOWN_CATEGORIES + ("step",):
        cells = []
        for method in methods:
            value, step = breakdown[method][category], breakdown[method]["step"]
            cells.append(f"{value:.1f}" if category == "step" else f"{value:.1f} ({value / step:.0%})")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=["llama2_7b_layers", "llama3_2_1b_layers", "tinystories656K", "tiny"],
                        default="llama2_7b_layers")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: 1 on CPU; on CUDA the real model's, 32 or 16)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=None)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled step per method")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS child runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--memory-worker", choices=METHODS + EXTRA_METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if args.layers is None:
        args.layers = LAYERS_ON_CUDA.get(args.shape, 1) if args.device == "cuda" else 1
    if args.methods is None:
        on_cpu = args.device == "cpu"
        args.methods = [m for m in METHODS if on_cpu or m.endswith("_bf16")]
    if args.device == "cuda" and any(m.endswith("_fp32") for m in args.methods):
        parser.error("the fp32 methods are CPU references; on CUDA compare the _bf16 ones")
    if args.shape == "tinystories656K":
        args.group_size = min(args.group_size, 32)
        args.rank = min(args.rank, 4)
        # torchao's to_nf4 quantizes the 64-value block scalers in blocks of 256, so a
        # weight needs numel / 64 divisible by 256; k_proj / v_proj here (64 x 128) give 128
        args.skipped = {m: QLORA_TINYSTORIES_REASON for m in args.methods if m.startswith("qlora")}
        args.methods = [m for m in args.methods if m not in args.skipped]
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
    torch.manual_seed(args.seed)
    state = _full_precision_state(args)
    trainers = [Trainer(method, args, state) for method in args.methods]
    report: Dict[str, Any] = {
        "environment": environment(args),
        "settings": {
            k: v for k, v in vars(args).items()
            if k not in ("json", "markdown", "memory_worker", "skipped")
        },
        "results": measure_throughput(trainers, args),
        "skipped": getattr(args, "skipped", {}),
    }
    if not args.no_breakdown:
        report["breakdown"] = {t.method: step_breakdown(t) for t in trainers}
    del trainers
    if args.device == "cpu" and not args.no_memory:
        report["memory"] = measure_cpu_memory(args.methods, argv)
    table = markdown_table(report)
    if "breakdown" in report:
        table += "\n\n" + breakdown_table(report["breakdown"])
    for method, reason in report["skipped"].items():
        table += f"\n\n{method}: not run; {reason}."
    print(table)
    write_outputs(args.json, args.markdown, report, f"`{report['environment']['command']}`\n\n{table}\n")
    return report


if __name__ == "__main__":
    main()
