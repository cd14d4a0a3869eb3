"""The one reader of merged directories: every layout gives the model's own weights."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qalora_tune._compat import flatten_tensor_state_dict
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.checkpointing._merged_int4 import _read_tensors
from qalora_tune.export import (
    MergedLinearWeight,
    iter_merged_weights,
    merged_weight_files,
)
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization.base_weight import from_torchao_base
from qalora_tune.tiny import TINY_LLAMA_SIZES
from qalora_tune.tiny.hf_checkpoint import hf_llama_config
from tests.export.merged_models import write_merged_tiny


def _model_weights(model):
    """HF key -> the model's plain quantized weight (rows in HF order) or dense tensor."""
    key_map = HFKeyMap("LLAMA2", hf_llama_config(TINY_LLAMA_SIZES))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            hf_key, rows = key_map.row_order(f"{name}.weight", module.out_dim, to_hf=True)
            gq = from_torchao_base(module.weight)
            out[hf_key] = (gq.qdata[rows], gq.scale[rows], gq.zero[rows], gq.bits, gq.group_size)
    return out


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 64), (8, 32), (4, 8)])
def test_reader_yields_the_merged_codes_scales_and_zeros(tmp_path, bits, group_size):
    """int4 layouts (Int4Tensor) and intx ones (8 bits, or G=8) alike: the codes, scales
    and float zeros the model computes with, rows in Hugging Face order."""
    model = write_merged_tiny(tmp_path, bits, group_size)
    expected = _model_weights(model)
    seen = dict(iter_merged_weights(tmp_path))
    for key, (q, s, z, b, g) in expected.items():
        weight = seen[key]
        assert isinstance(weight, MergedLinearWeight), key
        gq = weight.quantized
        assert (gq.bits, gq.group_size, weight.shape) == (b, g, tuple(q.shape)), key
        assert torch.equal(gq.qdata, q) and torch.equal(gq.scale, s), key
        assert torch.equal(gq.zero, z), key
    assert len(expected) == 2 * 7 + 1  # every linear, the output projection included
    dense = {k for k, v in seen.items() if not isinstance(v, MergedLinearWeight)}
    assert dense == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }


def _save_torchao(tensors, path):
    data, metadata = flatten_tensor_state_dict(tensors)
    save_file(data, str(path), metadata=dict(metadata, format="pt"))


def test_sharded_and_plain_files_read_the_same(tmp_path):
    """An index over three shards: one torchao-flattened file with quantized and dense
    tensors, one plain safetensors file, one torchao file of quantized tensors only."""
    single = tmp_path / "single"
    write_merged_tiny(single)
    tensors = dict(_read_tensors(single / "model.safetensors"))
    keys = sorted(tensors)
    first, rest = keys[: len(keys) // 2], keys[len(keys) // 2:]
    plain = [k for k in rest if type(tensors[k]) is torch.Tensor]
    quantized = [k for k in rest if k not in plain]
    assert plain and quantized
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    _save_torchao({k: tensors[k] for k in first}, sharded / "model-1.safetensors")
    save_file({k: tensors[k] for k in plain}, str(sharded / "model-2.safetensors"))
    _save_torchao({k: tensors[k] for k in quantized}, sharded / "model-3.safetensors")
    weight_map = {k: "model-1.safetensors" for k in first}
    weight_map.update({k: "model-2.safetensors" for k in plain})
    weight_map.update({k: "model-3.safetensors" for k in quantized})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert [p.name for p in merged_weight_files(sharded)] == [f"model-{i}.safetensors" for i in (1, 2, 3)]
    one = dict(iter_merged_weights(single))
    other = dict(iter_merged_weights(sharded))
    assert one.keys() == other.keys()
    for key, value in one.items():
        theirs = other[key]
        if isinstance(value, MergedLinearWeight):
            assert torch.equal(value.quantized.qdata, theirs.quantized.qdata), key
            assert torch.equal(value.quantized.zero, theirs.quantized.zero), key
        else:
            assert torch.equal(value, theirs), key


def test_a_directory_without_weights_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        list(iter_merged_weights(tmp_path))
