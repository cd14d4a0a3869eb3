"""The merged model written as shards from a stream of tensors, in every merged format: the
index and the metadata Hugging Face writes, and the same model back through
``load_merged`` (and transformers, for the format stock torchao runs on CPU) whether it is
one file or several."""

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open

import qalora_tune
from qalora_tune.checkpointing import (
    SAFETENSORS_INDEX_NAME,
    merged_state_dict,
    write_merged_int4,
    write_merged_tensors,
)
from qalora_tune.checkpointing._hf_keys import HFKeyMap
from qalora_tune.modules import QuantizedLinear
from qalora_tune.tiny import TINY_LLAMA_SIZES
from qalora_tune.tiny.hf_checkpoint import hf_llama_config
from tests.export.merged_models import merged_tiny_model

FORMATS = ("intx", "int4_tile_packed", "int4_plain")


@pytest.fixture(scope="module")
def merged_model():
    return merged_tiny_model(bits=4, group_size=32)


def _write(model, directory, merged_format, max_shard_size):
    config = hf_llama_config(TINY_LLAMA_SIZES)
    spec = {"model": {"_component_": "qalora_tune.tiny.qalora_tiny_llama",
                      "lora_attn_modules": [], "group_size": 32}, "model_type": "LLAMA2"}
    directory.mkdir(parents=True)
    return write_merged_int4(model, directory, HFKeyMap("LLAMA2", config), config, spec,
                             merged_format, max_shard_size=max_shard_size)


@pytest.fixture(scope="module", params=FORMATS)
def written(merged_model, tmp_path_factory, request):
    root = tmp_path_factory.mktemp(request.param)
    single = _write(merged_model, root / "single", request.param, "5GB")
    sharded = _write(merged_model, root / "sharded", request.param, 40_000)
    return root / "single", single, root / "sharded", sharded, request.param


def test_shards_are_named_and_indexed_like_hugging_face(written):
    single_dir, single, sharded_dir, sharded, merged_format = written
    assert json.loads((sharded_dir / "qalora_tune.json").read_text())["format"] == merged_format
    assert not list(sharded_dir.glob(".*"))  # no temporary file left behind
    assert single["shards"] == 1 and sorted(p.name for p in single_dir.glob("*.safetensors")) == [
        "model.safetensors"]
    count = sharded["shards"]
    assert count > 2
    names = sorted(p.name for p in sharded_dir.glob("*.safetensors"))
    assert names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((sharded_dir / SAFETENSORS_INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert sharded["quantized_bytes"] == single["quantized_bytes"]
    metadata = []
    for name in names:
        with safe_open(str(sharded_dir / name), framework="pt") as handle:
            metadata.append(handle.metadata())
            keys = set(handle.keys())
        assert {k for k, v in index["weight_map"].items() if v == name} == keys
    # every shard carries the whole model's torchao metadata, as transformers writes it
    assert all(m == metadata[0] for m in metadata)
    with safe_open(str(single_dir / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata[0]


@torch.no_grad()
def test_load_merged_reads_the_shards_into_the_same_model(written, merged_model):
    single_dir, _, sharded_dir, _, merged_format = written
    one, many = qalora_tune.load_merged(single_dir), qalora_tune.load_merged(sharded_dir)
    for (name, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        if isinstance(a, torch.Tensor) and type(a) is torch.Tensor:
            assert torch.equal(a, b), name
    for name, module in one.named_modules():
        if isinstance(module, QuantizedLinear):
            theirs = many.get_submodule(name).weight
            assert torch.equal(module.weight.qdata, theirs.qdata), name
            assert torch.equal(module.weight.scale_and_zero, theirs.scale_and_zero), name
    tokens = torch.randint(0, TINY_LLAMA_SIZES["vocab_size"], (2, 12))
    assert torch.equal(one(tokens), many(tokens))
    if merged_format == "int4_plain":  # the training storage's codes, scales and zeros
        torch.testing.assert_close(many(tokens), merged_model(tokens), rtol=0, atol=0)
    else:  # zero points in the file's convention (intx: -z/s in fp32; tile: bf16)
        torch.testing.assert_close(many(tokens), merged_model(tokens), rtol=2e-2, atol=2e-2)


@torch.no_grad()
def test_transformers_loads_the_shards(written):
    from transformers import AutoModelForCausalLM

    single_dir, _, sharded_dir, _, merged_format = written
    if merged_format != "intx":
        pytest.skip(f"stock torchao runs {merged_format} on CUDA only")
    tokens = torch.randint(0, TINY_LLAMA_SIZES["vocab_size"], (1, 10))
    one = AutoModelForCausalLM.from_pretrained(str(single_dir)).eval()
    many = AutoModelForCausalLM.from_pretrained(str(sharded_dir)).eval()
    assert type(many.model.layers[1].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert torch.equal(one(tokens).logits, many(tokens).logits)


@pytest.mark.parametrize("merged_format", FORMATS)
def test_the_writer_takes_one_tensor_at_a_time(merged_model, tmp_path, merged_format):
    """Each tensor is written before the next is made, and nothing keeps it afterwards."""
    config = hf_llama_config(TINY_LLAMA_SIZES)
    alive_when_made = []
    refs = []

    def spy(stream):
        for key, tensor in stream:
            gc.collect()
            alive_when_made.append([k for k, r in refs if r() is not None])
            refs.append((key, weakref.ref(tensor)))
            yield key, tensor
            del tensor

    stream = spy(merged_state_dict(merged_model, HFKeyMap("LLAMA2", config), merged_format))
    write_merged_tensors(stream, tmp_path, config, {"model": {}}, {}, max_shard_size=40_000)
    # int4 weights are made on demand: only the model's own dense tensors may live on
    made = {k for k, _ in refs if "proj" in k}
    assert made and all(not (set(alive) & made) for alive in alive_when_made)


@pytest.mark.parametrize("merged_format", FORMATS)
def test_flatten_one_equals_torchaos_flatten_without_the_copy(merged_model, merged_format):
    from qalora_tune._compat import flatten_tensor_state_dict
    from qalora_tune.checkpointing._merged_int4 import flatten_one
    from qalora_tune.quantization import quantize_rtn
    from qalora_tune.quantization.intx_weight import as_stock_intx, to_torchao_intx

    config = hf_llama_config(TINY_LLAMA_SIZES)
    key, portable = next(
        (k, v) for k, v in merged_state_dict(merged_model, HFKeyMap("LLAMA2", config), merged_format)
        if "q_proj" in k
    )
    intx = as_stock_intx(to_torchao_intx(quantize_rtn(torch.randn(8, 32), 8, bits=8), dtype=torch.float32))
    for name, value in ((key, portable), ("model.x.weight", intx), ("model.norm.weight", torch.ones(3))):
        ours, our_metadata = flatten_one(name, value)
        theirs, their_metadata = flatten_tensor_state_dict({name: value})
        assert our_metadata == their_metadata and set(ours) == set(theirs)
        for entry, tensor in theirs.items():
            assert torch.equal(ours[entry], tensor) and ours[entry].dtype == tensor.dtype
        if type(value) is not torch.Tensor:  # the entries are the tensor's own, not copies
            assert ours[f"{name.rsplit('.', 1)[0]}._weight_qdata"].data_ptr() == value.qdata.data_ptr()
