"""Real model shapes as random-weight Hugging Face checkpoints, with stand-in tokenizers.

Used by ``benchmarks/real_size.py`` and by the real-shape tests: a checkpoint with the
widths (and, unless ``layers`` says otherwise, the depth) of a hub model, random bf16
weights, sharded and indexed as the hub shards it, written one tensor at a time (never the
whole model in memory). The real tokenizers are not available offline, so each shape gets a
small stand-in tokenizer file of its tokenizer's format (SentencePiece for Llama 2 and
Mistral, tiktoken for Llama 3, byte-level BPE for Qwen2.5) whose ids fit the vocabulary,
and a synthetic English-like text to train on.
"""

import base64
import json
import math
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from qalora_tune.checkpointing._safetensors_io import ShardedSafetensorsWriter

__all__ = [
    "SHAPES",
    "hf_config",
    "hf_tensor_shapes",
    "write_corpus",
    "write_random_checkpoint",
    "write_stand_in_tokenizer",
]

_COMMON = {"hidden_act": "silu", "initializer_range": 0.02, "use_cache": True,
           "torch_dtype": "bfloat16"}
_LLAMA = dict(_COMMON, architectures=["LlamaForCausalLM"], model_type="llama",
              attention_bias=False, mlp_bias=False, pretraining_tp=1)
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# name -> (Hugging Face config.json, packaged config, tokenizer kind, checkpoint shards)
# what every Llama 2 and every Llama 3.x shape share
_LLAMA2 = dict(_LLAMA, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(_LLAMA, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)


def _shape(base: Dict[str, Any], packaged_config: str, tokenizer: str, **sizes: Any) -> Dict[str, Any]:
    return {"config": dict(base, **sizes), "packaged_config": packaged_config, "tokenizer": tokenizer}


SHAPES: Dict[str, Dict[str, Any]] = {
    "llama2_7b": _shape(_LLAMA2, "llama2_7B_qalora", "sentencepiece", hidden_size=4096,
                        intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                        num_hidden_layers=32),
    "llama2_13b": _shape(_LLAMA2, "llama2_13B_qalora", "sentencepiece", hidden_size=5120,
                         intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                         num_hidden_layers=40),
    "llama2_70b": _shape(_LLAMA2, "llama2_70B_qalora", "sentencepiece", hidden_size=8192,
                         intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                         num_hidden_layers=80),
    "llama3_1_8b": _shape(_LLAMA3, "llama3_1_8B_qalora", "tiktoken", hidden_size=4096,
                          intermediate_size=14336, num_attention_heads=32, num_hidden_layers=32,
                          rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False),
    "llama3_2_1b": _shape(_LLAMA3, "llama3_2_1B_qalora", "tiktoken", hidden_size=2048,
                          intermediate_size=8192, num_attention_heads=32, num_hidden_layers=16,
                          head_dim=64, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                          tie_word_embeddings=True),
    "llama3_2_3b": _shape(_LLAMA3, "llama3_2_3B_qalora", "tiktoken", hidden_size=3072,
                          intermediate_size=8192, num_attention_heads=24, num_hidden_layers=28,
                          head_dim=128, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                          tie_word_embeddings=True),
    "qwen2_5_7b": _shape(
        dict(_COMMON, architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
        "qwen2_5_7B_qalora", "qwen2", hidden_size=3584, intermediate_size=18944,
        num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
        max_window_layers=28, bos_token_id=151643, eos_token_id=151643),
    "mistral_7b": _shape(
        dict(_COMMON, architectures=["MistralForCausalLM"], model_type="mistral"),
        "mistral_7B_qalora", "sentencepiece", hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def hf_config(shape: str, layers: Optional[int] = None) -> Dict[str, Any]:
    """``config.json`` of ``shape``, with ``layers`` decoder layers when given."""
    config = json.loads(json.dumps(SHAPES[shape]["config"]))
    if layers is not None:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    return config


def hf_tensor_shapes(config: Dict[str, Any]) -> List[Tuple[str, Tuple[int, ...]]]:
    """Every weight of the checkpoint, in the hub's order, with its shape."""
    dim, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or dim // heads
    biased = config["model_type"] == "qwen2"  # Qwen2 has q/k/v biases
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], dim))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, out_dim in (("q", heads * head_dim), ("k", kv_heads * head_dim),
                              ("v", kv_heads * head_dim)):
            shapes.append((f"{p}self_attn.{name}_proj.weight", (out_dim, dim)))
            if biased:
                shapes.append((f"{p}self_attn.{name}_proj.bias", (out_dim,)))
        shapes += [
            (f"{p}self_attn.o_proj.weight", (dim, heads * head_dim)),
            (f"{p}mlp.gate_proj.weight", (inter, dim)),
            (f"{p}mlp.up_proj.weight", (inter, dim)),
            (f"{p}mlp.down_proj.weight", (dim, inter)),
            (f"{p}input_layernorm.weight", (dim,)),
            (f"{p}post_attention_layernorm.weight", (dim,)),
        ]
    shapes.append(("model.norm.weight", (dim,)))
    if not config.get("tie_word_embeddings"):
        shapes.append(("lm_head.weight", (config["vocab_size"], dim)))
    return shapes


_POOL = 1 << 24
_BLOCK = 1 << 22


class _RandomWeights:
    """N(0, 0.02^2) weights, fast: one pool of normal values drawn from the seed, and every
    block of 2^22 values copied from a random offset into it (drawing each value afresh
    runs at ~70 M/s, copying at GB/s; random weights need no more independence). Norm
    weights are drawn as 1 + N(0, 0.02^2)."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(_POOL + _BLOCK, generator=self.generator).mul_(0.02).to(dtype)
        self.dtype = dtype

    def __call__(self, name: str, shape: Tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return (1.0 + 0.02 * torch.randn(shape, generator=self.generator)).to(self.dtype)
        out = torch.empty(shape, dtype=self.dtype)
        flat = out.view(-1)
        offsets = torch.randint(0, _POOL, (math.ceil(flat.numel() / _BLOCK),),
                                generator=self.generator).tolist()
        for index, offset in enumerate(offsets):
            block = flat[index * _BLOCK:(index + 1) * _BLOCK]
            block.copy_(self.pool[offset:offset + block.numel()])
        return out


def write_random_checkpoint(
    directory: Path,
    shape: str,
    layers: Optional[int] = None,
    shards: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
) -> Dict[str, Any]:
    """Write ``config.json`` and random weights of ``shape`` into ``directory``.

    Args:
        directory (Path): created if needed.
        shape (str): a key of :data:`SHAPES`.
        layers (int, optional): decoder layers (default: the real model's).
        shards (int, optional): number of weight files, cut at equal byte counts (default:
            one per 2 GB, about as the hub shards the Llama 2 checkpoints).
        seed (int): seed of the weights.
        dtype (torch.dtype): weight dtype (bf16 like the hub's Llama 3 and Qwen2.5).
        progress (bool): show a progress bar.

    Returns:
        Dict[str, Any]: the config, the files written and the bytes of tensor data.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config(shape, layers)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    shapes = hf_tensor_shapes(config)
    sizes = [math.prod(s) * dtype.itemsize for _, s in shapes]
    total = sum(sizes)
    shards = shards or max(1, math.ceil(total / 2e9))
    writer = ShardedSafetensorsWriter(directory, max_shard_size=total + 1,
                                      metadata={"format": "pt"})
    random_weights = _RandomWeights(seed, dtype)
    bar = _progress(total, f"writing {shape}", progress)
    shard, shard_start, written = 0, 0, 0
    for (name, tensor_shape), size in zip(shapes, sizes):
        # the bytes left are shared equally by the files left
        target = (total - shard_start) / (shards - shard)
        if shard < shards - 1 and written > shard_start and written - shard_start + size > target:
            writer.start_shard()
            shard, shard_start = shard + 1, written
        writer.add({name: random_weights(name, tensor_shape)})
        written += size
        bar(size)
    files = writer.close()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "do_sample": False}, indent=2))
    return {"config": config, "files": [f.name for f in files], "bytes": total}


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True)
    return bar.update


_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "el", "ir", "os", "ul",
              "be", "de", "fa", "gu", "ho", "jo", "ve", "wi", "ze", "th", "st", "er")


def write_corpus(path: Path, words: int = 20000, seed: int = 0) -> Path:
    """A synthetic English-like text (made-up words, sentences, paragraphs)."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
                  for _ in range(400)]
    lines, sentence = [], []
    for index in range(words):
        sentence.append(rng.choice(vocabulary))
        if len(sentence) >= rng.randint(6, 14):
            lines.append(" ".join(sentence).capitalize() + ".")
            sentence = []
        if index % 120 == 119:
            lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_stand_in_tokenizer(shape: str, directory: Path, corpus: Path) -> Dict[str, str]:
    """A small tokenizer of ``shape``'s tokenizer format, written into ``directory``.

    - ``sentencepiece`` (Llama 2, Mistral): ``tokenizer.model`` trained on ``corpus``
      (512 pieces, unk 0, bos 1, eos 2 as Llama's);
    - ``tiktoken`` (Llama 3): ``tokenizer.model`` with the 256 single-byte tokens (the
      special tokens keep their real ids, 128000 and up);
    - ``qwen2`` (Qwen2.5): ``vocab.json`` with the 256 byte-level tokens and an empty
      ``merges.txt`` (special tokens at their real ids, 151643 and up).

    Returns:
        Dict[str, str]: the ``tokenizer.*`` overrides that point a config at it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = SHAPES[shape]["tokenizer"]
    if kind == "sentencepiece":
        import sentencepiece

        model = directory / "tokenizer.model"
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(model.with_suffix("")), vocab_size=512,
            model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )
        return {"path": str(model)}
    if kind == "tiktoken":
        model = directory / "tokenizer.model"
        model.write_text("".join(
            f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
        return {"path": str(model)}
    vocab = {character: index for index, character in enumerate(_byte_level_alphabet())}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return {"path": str(directory / "vocab.json"), "merges_file": str(directory / "merges.txt")}


def _byte_level_alphabet() -> Iterator[str]:
    """GPT-2's byte -> printable character map, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    for byte in range(256):
        if byte in printable:
            yield chr(byte)
        else:
            yield chr(256 + extra)
            extra += 1
