"""The exported GGUF in a real llama.cpp (llama-cpp-python), on three trained models:
merged stories260K (``pad_in_dim``: ``down_proj`` stays F32), merged TinyStories-656K (tied
embedding stored only as ``lm_head`` in the base), and the embedded ``tiny_qalora`` model.

Bounds: an export with every linear dequantized to F32, run with an F32 KV cache, must give
our logits to fp32 rounding (this pins the graph, the q/k row order and the metadata).
llama.cpp quantizes the activations of every ``Q4_1`` matmul to 8 bits (``Q8_1``), so the
``Q4_1`` logits are not our fp32 logits: ``llamacpp_harness.emulate_llama_cpp_q4_1``
applies exactly that rounding to our model, which says how large the deviation must be.
llama.cpp's default fp16 KV cache adds its own rounding, measured on the F32 export. Each
test prints what it measured (``-s``).
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import pytest
import torch

import qalora_tune
from qalora_tune.export import MergedLinearWeight, export_gguf, iter_merged_weights
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization.base_weight import from_torchao_base
from tests.export.llamacpp_harness import (
    emulate_llama_cpp_q4_1,
    gguf_name,
    greedy_llama,
    greedy_ours,
    llama_logits,
    model_logits,
    next_token_nll,
    open_llama,
    perplexity,
    q4_1_blocks,
    relative_errors,
    requires_llama_cpp,
)

pytestmark = [pytest.mark.llamacpp, pytest.mark.heavy, requires_llama_cpp]

ROOT = Path(__file__).resolve().parents[2]
SHARED = (ROOT / ".." / "shared").resolve()
TUNE = str(Path(sys.executable).with_name("tune"))
STORIES = SHARED / "data" / "tinystories_val_a.txt"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare_train.txt"
# llama.cpp at F32 vs transformers on stories260K: 2.7e-4; the same fp32 rounding, doubled
FP32_ROUNDING = 1e-3


@dataclass
class Exported:
    name: str
    merged_dir: Path
    gguf: Path
    report: dict
    n_ctx: int
    sequences: List[List[int]]  # held-out token sequences, each starting with BOS
    encode: Callable[[str], List[int]]  # our tokenizer, no BOS/EOS
    texts: List[str]  # samples for the tokenizer comparison
    prompt: List[int]


def _tune(*args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([TUNE, "run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


def _shared_run(out: Path, config: str, model: str, tokenizer: str, *extra):
    if not (SHARED / "models").is_dir():
        pytest.skip("needs ../shared (real tiny checkpoints and data)")
    _tune(
        "qalora_finetune", "--config", config, f"output_dir={out}",
        f"checkpointer.checkpoint_dir={SHARED / 'models' / model}",
        f"tokenizer.path={SHARED / 'models' / model / tokenizer}",
        f"dataset.path={SHAKESPEARE}", f"validation.dataset.path={SHAKESPEARE}",
        "validation.max_batches=2", "validation.full_precision_baseline=False",
        "batch_size=8", "max_steps_per_epoch=30", *extra,
    )
    return out / "epoch_0" / "merged_int4"


def _stream_windows(ids: List[int], bos: int, n_ctx: int, windows: int) -> List[List[int]]:
    """Held-out text as ``windows`` sequences of BOS + ``n_ctx - 1`` tokens."""
    step = n_ctx - 1
    assert len(ids) >= windows * step, "not enough held-out text"
    return [[bos] + ids[i * step:(i + 1) * step] for i in range(windows)]


def _paragraphs(path: Path, count: int) -> List[str]:
    parts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return parts[-count:]  # from the end: no overlap with the evaluation windows


def _stories260k(tmp: Path) -> Exported:
    from torchtune.models.llama2 import llama2_tokenizer

    merged = _shared_run(tmp / "run", "stories260K_qalora", "stories260K", "tokenizer.model")
    tokenizer = llama2_tokenizer(str(merged / "tokenizer.model"))
    encode = lambda text: tokenizer.encode(text, add_bos=False, add_eos=False)  # noqa: E731
    text = STORIES.read_text(encoding="utf-8")
    report = export_gguf(merged, tmp / "stories260K.gguf")
    return Exported(
        "stories260K", merged, tmp / "stories260K.gguf", report, 512,
        _stream_windows(encode(text[:40_000]), tokenizer.bos_id, 512, 4),
        encode, _paragraphs(STORIES, 40), [tokenizer.bos_id] + encode("Once upon a time"),
    )


def _tinystories656k(tmp: Path) -> Exported:
    from qalora_tune.data import text_tokenizer

    merged = _shared_run(tmp / "run", "tinystories656K_qalora", "tinystories656K", "tokenizer.json")
    tokenizer = text_tokenizer(str(merged / "tokenizer.json"), prepend_space=False)
    encode = lambda text: tokenizer.encode(text, add_bos=False, add_eos=False)  # noqa: E731
    text = STORIES.read_text(encoding="utf-8")
    # trained without a leading "▁" (tokenizer.prepend_space: False), which the file does not say
    report = export_gguf(merged, tmp / "tinystories656K.gguf", add_space_prefix=False)
    # no <0xXX> byte tokens: llama.cpp aborts on a character outside the vocabulary (the
    # data has a few mojibake quotes), so only paragraphs it can tokenize are compared
    vocab = json.loads((merged / "tokenizer.json").read_text())["model"]["vocab"]
    known = [p for p in _paragraphs(STORIES, 40) if all(c.replace(" ", "\u2581") in vocab for c in p)]
    return Exported(
        "tinystories656K", merged, tmp / "tinystories656K.gguf", report, 512,
        _stream_windows(encode(text[:40_000]), tokenizer.bos_id, 512, 4),
        encode, known, [tokenizer.bos_id] + encode("Once upon a time"),
    )


def _tiny(tmp: Path) -> Exported:
    from qalora_tune.tiny import TinyTokenizer, prepare_tiny_base
    from qalora_tune.tiny.task import generate_examples

    base = tmp / "base"
    prepare_tiny_base(str(base), seed=0, steps=300, log=None)
    _tune(
        "qalora_finetune", "--config", "tiny_qalora", f"output_dir={tmp / 'run'}",
        f"prepare_base.checkpoint_dir={base}", f"checkpointer.checkpoint_dir={base}",
        f"tokenizer.path={base / 'tiny_tokenizer.json'}", "max_steps_per_epoch=40",
        "validation.dataset.num_examples=64", "validation.max_batches=1",
        "validation.full_precision_baseline=False",
    )
    merged = tmp / "run" / "epoch_0" / "merged_int4"
    tokenizer = TinyTokenizer.load(str(merged))
    report = export_gguf(merged, tmp / "tiny.gguf")
    sentences = [p + a for p, a in generate_examples("validation", 150, seed=7)]
    return Exported(
        "tiny_qalora", merged, tmp / "tiny.gguf", report, 64,
        [tokenizer.encode(s) for s in sentences],
        lambda text: tokenizer.encode(text, add_bos=False, add_eos=False),
        sentences[:40], tokenizer.encode(sentences[0].split("=")[0] + "=", add_eos=False),
    )


@pytest.fixture(scope="module", params=["stories260K", "tinystories656K", "tiny_qalora"])
def exported(request, tmp_path_factory) -> Exported:
    build = {"stories260K": _stories260k, "tinystories656K": _tinystories656k, "tiny_qalora": _tiny}
    return build[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def ours(exported):
    """Our merged model, fp32, as ``qalora_tune.load_merged`` gives it."""
    return qalora_tune.load_merged(exported.merged_dir, dtype=torch.float32)


def test_weights_read_back_within_the_fp16_rounding_and_in_our_row_order(exported, ours):
    """Every Q4_1 tensor, parsed from the file, is our weight within the rounding of
    d = s and m = z - 8 s to fp16; q/k rows are in torchtune's (Meta's) order, which is
    llama.cpp's."""
    report = exported.report
    blocks = q4_1_blocks(exported.gguf)
    assert blocks, "no Q4_1 tensor written"
    merged = dict(iter_merged_weights(exported.merged_dir))
    for name, module in ours.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        entry = report["tensors"][gguf_name(name)]
        gq = from_torchao_base(module.weight)
        exact = gq.dequantize(torch.float64)[:, : module.in_dim]
        if gguf_name(name) not in blocks:
            assert entry["type"] == "F32" and "not Q4_1" in entry["reason"]
            continue
        d, m, q = blocks[gguf_name(name)]
        theirs = (d[..., None] * q + m[..., None]).flatten(1)
        s = gq.scale.double().repeat_interleave(gq.group_size // 32, 1)
        z_min = gq.zero.double().repeat_interleave(gq.group_size // 32, 1) - 8 * s
        bound = ((s.half().double() - s).abs()[..., None] * q + (z_min.half().double() - z_min).abs()[..., None]).flatten(1)
        assert ((theirs - exact).abs() <= bound + 1e-12).all(), name
        assert entry["max_relative_error"] <= entry["relative_bound"]
    assert all(isinstance(merged[e["source"]], MergedLinearWeight) for e in report["tensors"].values() if e["type"] == "Q4_1")
    if exported.name == "stories260K":  # in_dim 172: the only F32 linears
        fallback = sorted(n for n, e in report["tensors"].items() if "reason" in e)
        assert fallback == [f"blk.{i}.ffn_down.weight" for i in range(5)]
    print(
        f"\n{exported.name}: {report['tensor_counts']}, {report['file_bytes']} bytes, "
        f"{report['bits_per_weight']:.2f} bits/weight; Q4_1 max relative weight error "
        f"{report['q4_1_max_relative_error']:.3g} (bound {report['q4_1_relative_bound']:.3g})"
    )


@dataclass
class Measured:
    f32_exact: float  # max relative logit error, F32 export + F32 KV cache vs ours
    kv_cache: float  # the same with llama.cpp's default fp16 KV cache
    q8_1_emulated: torch.Tensor  # per position, our model with llama.cpp's Q8_1 products vs ours
    q4_1_f32_kv: torch.Tensor  # per position, llama.cpp Q4_1 (F32 KV cache) vs ours
    q4_1: torch.Tensor  # per position, llama.cpp Q4_1 (default KV cache) vs ours
    argmax_agreement: float
    argmax_agreement_emulated: float  # the Q8_1 emulation's argmax vs ours
    argmax_agreement_ties: float  # counting as agreeing the near-ties the Q8_1 rounding can flip
    perplexity_llama: float
    perplexity_ours: float
    positions: int


@pytest.fixture(scope="module")
def measured(exported, ours, tmp_path_factory) -> Measured:
    f32 = tmp_path_factory.mktemp("f32") / "f32.gguf"
    export_gguf(exported.merged_dir, f32, linear_type="f32", add_space_prefix=exported.report["tokenizer"]["add_space_prefix"])
    runs = {
        "f32_exact": open_llama(f32, exported.n_ctx, f32_kv_cache=True),
        "kv_cache": open_llama(f32, exported.n_ctx),
        "q4_1_f32_kv": open_llama(exported.gguf, exported.n_ctx, f32_kv_cache=True),
        "q4_1": open_llama(exported.gguf, exported.n_ctx),
    }
    errors = {name: [] for name in (*runs, "q8_1_emulated")}
    agree, agree_emulated, agree_ties, theirs_nll, ours_nll = 0, 0, 0, [], []
    for tokens in exported.sequences:
        mine = model_logits(ours, tokens)
        with emulate_llama_cpp_q4_1(ours, exported.gguf):
            emulated = model_logits(ours, tokens)
        errors["q8_1_emulated"].append(relative_errors(emulated, mine))
        agree_emulated += int((emulated.argmax(-1) == mine.argmax(-1)).sum())
        for name, llm in runs.items():
            theirs = llama_logits(llm, tokens)
            errors[name].append(relative_errors(theirs, mine))
            if name == "q4_1":
                agree += int((theirs.argmax(-1) == mine.argmax(-1)).sum())
                # a near-tie: our logits for the two argmaxes differ by less than twice what
                # the Q8_1 rounding moves a logit at that position (emulated)
                gap = mine.max(-1).values - mine.gather(-1, theirs.argmax(-1, keepdim=True))[:, 0]
                agree_ties += int((gap <= 2 * (emulated - mine).abs().max(-1).values).sum())
                theirs_nll.append(next_token_nll(theirs, tokens))
                ours_nll.append(next_token_nll(mine, tokens))
    for llm in runs.values():
        llm.close()
    errors = {name: torch.cat(e) for name, e in errors.items()}
    result = Measured(
        f32_exact=errors["f32_exact"].max().item(), kv_cache=errors["kv_cache"].max().item(),
        q8_1_emulated=errors["q8_1_emulated"], q4_1_f32_kv=errors["q4_1_f32_kv"], q4_1=errors["q4_1"],
        argmax_agreement=agree / len(errors["q4_1"]),
        argmax_agreement_emulated=agree_emulated / len(errors["q4_1"]),
        argmax_agreement_ties=agree_ties / len(errors["q4_1"]), perplexity_llama=perplexity(theirs_nll),
        perplexity_ours=perplexity(ours_nll), positions=len(errors["q4_1"]),
    )
    print(
        f"\n{exported.name} ({result.positions} positions), max | mean relative logit error vs ours: "
        f"F32 export {result.f32_exact:.3g}; F32 export, fp16 KV cache {result.kv_cache:.3g}; "
        f"Q8_1 emulation {result.q8_1_emulated.max():.3g} | {result.q8_1_emulated.mean():.3g}; "
        f"llama.cpp Q4_1, F32 KV {result.q4_1_f32_kv.max():.3g} | {result.q4_1_f32_kv.mean():.3g}; "
        f"llama.cpp Q4_1 {result.q4_1.max():.3g} | {result.q4_1.mean():.3g}; argmax agreement "
        f"{result.argmax_agreement:.4f} (Q8_1 emulation {result.argmax_agreement_emulated:.4f}; "
        f"near-ties counted {result.argmax_agreement_ties:.4f}); perplexity llama.cpp {result.perplexity_llama:.4f} vs ours "
        f"{result.perplexity_ours:.4f} ({result.perplexity_llama / result.perplexity_ours - 1:+.2e})"
    )
    return result


def test_the_f32_export_runs_our_model_in_llama_cpp_to_fp32_rounding(measured):
    """Every linear dequantized to F32, F32 KV cache: nothing is quantized on either side, so
    the graph, the q/k row order, RoPE and the hyperparameters must agree to fp32 rounding
    (measured 1.8e-6 on stories260K; the F32 reference point vs transformers was 2.7e-4)."""
    assert measured.f32_exact <= 1e-4


def test_the_q4_1_deviation_is_the_q8_1_activation_rounding(measured):
    """llama.cpp's Q4_1 kernels round each block of 32 activations to 8 bits. The emulation
    applies exactly that rounding to our model; llama.cpp is another realisation of it (an
    fp32 difference upstream flips a rounding, so positions differ, not the statistics): its
    mean error must be the emulation's within a factor 2, and its largest at most twice the
    emulation's largest. Wrong d, m or codes would move every logit far more."""
    ratio = (measured.q4_1_f32_kv.mean() / measured.q8_1_emulated.mean()).item()
    assert 0.5 <= ratio <= 2.0
    assert measured.q4_1_f32_kv.max() <= 2 * measured.q8_1_emulated.max()


def test_logits_perplexity_and_argmax_agree_with_our_model(measured):
    """llama.cpp as users run it (fp16 KV cache): within twice the Q8_1 emulation's largest
    error plus twice what the fp16 KV cache alone costs (measured on the F32 export);
    perplexity within 1%; argmax on >= 99% of positions once near-ties are counted.

    Raw argmax agreement is below 99% on TinyStories-656K (measured 98.4% with the 0.1
    adapters, mean pooling and lr 1e-2; 97.5% with the measured defaults that replaced
    them, which move the model further), and so is that of the exact Q8_1 emulation of llama.cpp's arithmetic: every position where they
    differ has our two candidates within what 8-bit activations move a logit. The raw
    figure must still be the emulation's within half a percent, and above 97%.
    """
    assert measured.q4_1.max() <= 2 * measured.q8_1_emulated.max() + 2 * measured.kv_cache + FP32_ROUNDING
    assert abs(measured.perplexity_llama / measured.perplexity_ours - 1) <= 0.01
    assert measured.argmax_agreement_ties >= 0.99
    assert measured.argmax_agreement >= measured.argmax_agreement_emulated - 0.005
    assert measured.argmax_agreement >= 0.97


def test_greedy_generations_agree_for_16_tokens(exported, ours):
    llm = open_llama(exported.gguf, exported.n_ctx)
    steps = min(24, exported.n_ctx - len(exported.prompt))
    theirs = greedy_llama(llm, exported.prompt, steps)
    mine = greedy_ours(ours, exported.prompt, steps)
    llm.close()
    same = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), steps)
    print(f"\n{exported.name}: greedy continuations agree for {same} of {steps} tokens: {theirs}")
    assert same >= 16, (theirs, mine)


def test_llama_cpp_tokenizes_like_our_tokenizer(exported):
    """Same ids for held-out text, where llama.cpp's algorithm can reproduce ours."""
    llm = open_llama(exported.gguf, exported.n_ctx)
    matches = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) == exported.encode(t) for t in exported.texts]
    bos = llm.token_bos()
    llm.close()
    share = sum(matches) / len(matches)
    print(f"\n{exported.name}: llama.cpp tokenizes {sum(matches)}/{len(matches)} samples exactly like ours")
    # the BPE tokenizer.json (TinyStories-656K) is emulated by score-ordered merging: measured
    assert share == 1.0 or exported.name == "tinystories656K"
    assert share >= 0.9
    assert bos == exported.sequences[0][0]


def test_cli_export_of_the_trained_model_matches_the_library(exported, tmp_path):
    out = tmp_path / "cli.gguf"
    args = ["export-gguf", str(exported.merged_dir), str(out), "--report", str(tmp_path / "r.json")]
    if exported.name == "tinystories656K":
        args += ["--space-prefix", "no"]
    result = subprocess.run([str(Path(sys.executable).with_name("qalora-tune")), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes() == exported.gguf.read_bytes()
    assert json.loads((tmp_path / "r.json").read_text())["tensor_counts"] == exported.report["tensor_counts"]
