"""Export a merged QA-LoRA int4 model to GGUF for llama.cpp and ollama, exactly.

Every quantized linear whose group size and row length are multiples of 32 becomes GGML
``Q4_1`` with ``d = s`` and ``m = z - 8 s`` (:mod:`qalora_tune.export._q4_1`): the same
codes, the only rounding fp16 of ``d`` and ``m``. Linears that cannot (``in_dim`` not a
multiple of 32, e.g. stories260K's ``down_proj`` with 172 inputs; group sizes such as 8 or
16; 8-bit codes) are written dequantized in F32, exact to fp32 rounding. Embeddings and the
dense output projection are F32 or F16 (``dense_type``), norms always F32.

Written with the ``gguf`` package (llama.cpp's own writer): ``pip install 'qalora-tune[gguf]'``.
"""

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from qalora_tune.export._llama_hparams import (
    LlamaHParams,
    llama_hparams,
    rope_row_order,
)
from qalora_tune.export._merged_reader import (
    MergedLinearWeight,
    iter_merged_weights,
    read_merged_config,
)
from qalora_tune.export._q4_1 import Q4_1Error, pack_q4_1, q4_1_refusal
from qalora_tune.export._vocab import GGUFVocab, read_vocab
from qalora_tune.quantization import GroupQuantizedWeight

__all__ = ["DENSE_TYPES", "LINEAR_TYPES", "export_gguf"]

DENSE_TYPES = ("f32", "f16")
"""Storage choices for embeddings and a dense output projection."""
LINEAR_TYPES = ("q4_1", "f32")
"""Storage choices for quantized linears: Q4_1 where exact, or every one dequantized to F32
(an fp32 reference of the same model in llama.cpp, or input for ``llama-quantize``)."""

_EMBEDDING = "token_embd.weight"
_OUTPUT = "output.weight"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "the GGUF export needs the gguf package (llama.cpp's writer); "
            "pip install 'qalora-tune[gguf]'"
        ) from None
    return gguf


def export_gguf(
    merged_dir: Union[str, Path],
    out_path: Union[str, Path],
    *,
    dense_type: str = "f32",
    linear_type: str = "q4_1",
    add_space_prefix: Optional[bool] = None,
    name: Optional[str] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Write a ``merged_int4/`` directory as a llama-architecture GGUF file.

    The file is written beside ``out_path`` under a temporary name, flushed to disk, then
    renamed: ``out_path`` exists only when complete.

    Args:
        merged_dir (str or Path): a merged model directory (``config.json``, weights,
            tokenizer files).
        out_path (str or Path): the ``.gguf`` file to write.
        dense_type (str): ``"f32"`` or ``"f16"`` for embeddings and a dense output
            projection (norms stay F32, quantized linears ``Q4_1`` or F32).
        linear_type (str): ``"q4_1"`` (quantized linears as ``Q4_1`` where exact, else
            F32) or ``"f32"`` (every quantized linear dequantized to F32).
        add_space_prefix (bool, optional): whether llama.cpp prepends ``"▁"`` to text it
            tokenizes; defaults to what the tokenizer file says. TinyStories-656K was
            trained without it: pass False for it.
        name (str, optional): ``general.name``; defaults to the directory's name.
        overwrite (bool): replace an existing ``out_path``.

    Returns:
        Dict[str, Any]: the report: per tensor its GGUF type, source, shape and error
        against the merged weight; counts per type; the largest relative error of the
        ``Q4_1`` tensors; file size and bits per weight; tokenizer conversion.

    Raises:
        FileNotFoundError: if ``merged_dir`` lacks a file.
        FileExistsError: if ``out_path`` exists and ``overwrite`` is False.
        ValueError: for anything that cannot be exported exactly (the message names what to
            change).
        ImportError: if the ``gguf`` package is missing.
    """
    gguf = _gguf()
    if dense_type not in DENSE_TYPES:
        raise ValueError(f"dense_type={dense_type!r} is not supported; use one of {DENSE_TYPES}")
    if linear_type not in LINEAR_TYPES:
        raise ValueError(f"linear_type={linear_type!r} is not supported; use one of {LINEAR_TYPES}")
    merged_dir = Path(merged_dir).expanduser()
    out_path = Path(out_path).expanduser()
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; choose another name or allow overwriting (--force)")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"{out_path.parent} is not a directory; create it first")
    config = read_merged_config(merged_dir)
    hparams = llama_hparams(config)
    vocab = read_vocab(merged_dir, add_space_prefix)
    vocab.pad_to(hparams.n_vocab)

    writer = gguf.GGUFWriter(path=None, arch="llama", use_temp_file=True)
    staging = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    try:
        tensors = _add_tensors(writer, gguf, merged_dir, hparams, dense_type, linear_type)
        _add_metadata(writer, gguf, hparams, vocab, name or merged_dir.resolve().name, tensors)
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, out_path)
        _fsync_directory(out_path.parent)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    return _report(merged_dir, out_path, hparams, vocab, tensors, dense_type, linear_type)


def _add_tensors(
    writer, gguf, merged_dir: Path, hp: LlamaHParams, dense_type: str, linear_type: str
) -> Dict[str, Dict[str, Any]]:
    """Convert and add every tensor; returns the per-tensor report entries."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layers)
    tensors: Dict[str, Dict[str, Any]] = {}
    for key, value in iter_merged_weights(merged_dir):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(
                f"{merged_dir}: tensor {key} has no place in llama.cpp's llama architecture; "
                "export a plain Llama model"
            )
        if hp.tied_embeddings and name in (_EMBEDDING, _OUTPUT):
            if _EMBEDDING in tensors:
                continue  # the other copy of the tied embedding
            name = _EMBEDDING
        elif name in tensors:
            raise ValueError(f"{merged_dir}: two tensors map to {name}; the weights are inconsistent")
        value = _to_llama_rows(name, value, hp)
        tensors[name] = _add_one(writer, gguf, name, key, value, dense_type, linear_type)
    if _EMBEDDING not in tensors:
        raise ValueError(f"{merged_dir} has no token embedding (model.embed_tokens.weight or a tied lm_head.weight)")
    rows = tensors[_EMBEDDING]["shape"][0]
    if rows != hp.n_vocab:
        raise ValueError(
            f"{merged_dir}: the token embedding has {rows} rows but config.json's vocab_size is "
            f"{hp.n_vocab}; set vocab_size to {rows}"
        )
    if not hp.tied_embeddings and _OUTPUT not in tensors:
        raise ValueError(
            f"{merged_dir}: config.json says tie_word_embeddings is false but lm_head.weight "
            "is missing; set tie_word_embeddings to true if the output is the embedding"
        )
    if hp.rope_freq_factors is not None:
        factors = np.asarray(hp.rope_freq_factors, dtype=np.float32)
        rope = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(rope, factors)
        tensors[rope] = {"type": "F32", "source": "config.json rope_scaling (llama3)",
                         "shape": [len(factors)], "max_relative_error": 0.0}
    return tensors


def _to_llama_rows(name: str, value, hp: LlamaHParams):
    """Reorder ``q``/``k`` rows from Hugging Face's RoPE layout to llama.cpp's."""
    if ".attn_q." in name:
        heads = hp.n_head
    elif ".attn_k." in name:
        heads = hp.n_head_kv
    else:
        return value
    rows = rope_row_order(value.shape[0], heads)
    if isinstance(value, MergedLinearWeight):
        gq = value.quantized
        permuted = GroupQuantizedWeight(
            gq.qdata[rows], gq.scale[rows], gq.zero[rows], gq.group_size, gq.bits
        )
        return MergedLinearWeight(permuted, value.in_features, value.stored_as)
    return value[rows]


def _add_one(writer, gguf, name: str, key: str, value, dense_type: str, linear_type: str) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"source": key, "shape": list(value.shape)}
    if isinstance(value, MergedLinearWeight):
        gq = value.quantized
        entry.update(stored_as=value.stored_as, bits=gq.bits, group_size=gq.group_size)
        reason = q4_1_refusal(value) if linear_type == "q4_1" else "linear_type='f32' was asked for"
        if reason is None:
            blocks, error = pack_q4_1(value)
            writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            entry.update(type="Q4_1", **_error_entry(error))
            return entry
        exact = value.dequantize(torch.float64)
        dense, error = _dense(exact, torch.float32)
        writer.add_tensor(name, dense)
        entry.update(type="F32", reason=f"not Q4_1: {reason}; dequantized", **error)
        return entry
    exact = value.detach().cpu()
    dtype = torch.float16 if dense_type == "f16" and exact.dim() == 2 else torch.float32
    dense, error = _dense(exact.double(), dtype)
    writer.add_tensor(name, dense)
    entry.update(type="F16" if dtype == torch.float16 else "F32", stored_as=str(exact.dtype).removeprefix("torch."), **error)
    return entry


def _dense(exact: torch.Tensor, dtype: torch.dtype) -> Tuple[np.ndarray, Dict[str, float]]:
    """``exact`` (float64) rounded to ``dtype`` as numpy, and its rounding error."""
    rounded = exact.to(dtype)
    error = (rounded.double() - exact).abs().max().item() if exact.numel() else 0.0
    largest = exact.abs().max().item() if exact.numel() else 0.0
    return rounded.numpy(), {
        "max_abs_error": error,
        "max_relative_error": error / largest if largest else 0.0,
    }


def _error_entry(error: Q4_1Error) -> Dict[str, float]:
    return {
        "max_abs_error": error.max_abs_error,
        "max_relative_error": error.max_relative_error,
        "relative_bound": error.relative_bound,
        "max_abs_bound": error.max_abs_bound,
    }


def _add_metadata(writer, gguf, hp: LlamaHParams, vocab: GGUFVocab, name: str, tensors) -> None:
    writer.add_name(name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layers)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_factor)
    types = {entry["type"] for tensor, entry in tensors.items() if tensor.endswith(".weight")}
    if "Q4_1" in types:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    else:
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if "F16" in types else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for setter, value in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_unk_token_id, vocab.unk_id),
        (writer.add_pad_token_id, vocab.pad_id),
    ):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)


def _report(
    merged_dir: Path, out_path: Path, hp: LlamaHParams, vocab: GGUFVocab, tensors, dense_type: str,
    linear_type: str,
) -> Dict[str, Any]:
    counts: Dict[str, int] = {}
    parameters: Dict[str, int] = {}
    for entry in tensors.values():
        counts[entry["type"]] = counts.get(entry["type"], 0) + 1
        parameters[entry["type"]] = parameters.get(entry["type"], 0) + int(np.prod(entry["shape"]))
    q4_1 = [e for e in tensors.values() if e["type"] == "Q4_1"]
    file_bytes = out_path.stat().st_size
    total = sum(parameters.values())
    hparams = {k: v for k, v in asdict(hp).items() if k != "rope_freq_factors"}
    return {
        "merged_dir": str(merged_dir),
        "gguf": str(out_path),
        "architecture": "llama",
        "dense_type": dense_type,
        "linear_type": linear_type,
        "hparams": hparams,
        "tensors": tensors,
        "tensor_counts": counts,
        "parameters_by_type": parameters,
        "q4_1_max_relative_error": max((e["max_relative_error"] for e in q4_1), default=0.0),
        "q4_1_relative_bound": max((e["relative_bound"] for e in q4_1), default=0.0),
        "max_relative_error": max(e["max_relative_error"] for e in tensors.values()),
        "relative_error_definition": (
            "per tensor max |w_gguf - w| / max |w|, w the merged weight in float64, "
            "w_gguf as llama.cpp dequantizes it"
        ),
        "file_bytes": file_bytes,
        "parameters": total,
        "bits_per_weight": 8 * file_bytes / total,
        "q4_1_bits_per_weight": 8 * 20 / 32,
        "tokenizer": {
            "source": vocab.source,
            "model": "llama",
            "tokens": len(vocab.tokens),
            "bos_id": vocab.bos_id,
            "eos_id": vocab.eos_id,
            "unk_id": vocab.unk_id,
            "pad_id": vocab.pad_id,
            "add_bos": vocab.add_bos,
            "add_space_prefix": vocab.add_space_prefix,
            "notes": vocab.notes,
        },
    }


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
