"""Switching tasks on a loaded base: bit for bit the task's own merged model, in every storage,
all or nothing, codes and scales untouched."""

import pytest
import torch

import qalora_tune
from qalora_tune.modules import QuantizedLinear
from qalora_tune.quantization.base_weight import stored_zero_points
from qalora_tune.quantization.int4_weight import from_torchao_int4
from qalora_tune.quantization.intx_weight import is_intx_weight, to_torchao_intx
from qalora_tune.tasks import (
    current_task,
    enable_task_switching,
    export_task,
    export_task_from_merged,
    load_task,
    model_fingerprint,
    read_task_package,
)
from qalora_tune.tasks import switch as switch_module
from tests.tasks.family import (
    CONFIG,
    KEY_MAP,
    assert_same_model,
    build,
    make_family,
    merge_random_adapters,
    plain_weights,
    zeros_snapshot,
)

# (bits, group size, dtype, 8-bit scales, merged format of the files): intx is the default
# merged output on CPU; 8 bits and group size 16 are intx in memory too
STORAGES = [
    pytest.param(2, 32, torch.float32, False, "intx", id="2bit-g32-fp32-intx"),
    pytest.param(3, 32, torch.float32, False, "intx", id="3bit-g32-fp32-intx"),
    pytest.param(4, 64, torch.float32, False, "intx", id="4bit-g64-fp32-intx"),
    pytest.param(4, 32, torch.bfloat16, False, "intx", id="4bit-g32-bf16-intx"),
    pytest.param(8, 32, torch.float32, False, "intx", id="8bit-fp32-intx"),
    pytest.param(4, 16, torch.bfloat16, False, "intx", id="4bit-g16-bf16-intx"),
    pytest.param(4, 32, torch.float32, False, "int4_plain", id="4bit-g32-fp32-plain"),
    pytest.param(3, 32, torch.bfloat16, False, "int4_plain", id="3bit-g32-bf16-plain"),
    pytest.param(4, 64, torch.bfloat16, False, "int4_tile_packed", id="4bit-g64-bf16-tile"),
    pytest.param(2, 32, torch.float32, False, "int4_tile_packed", id="2bit-g32-fp32-tile"),
]


def _packages(family, root):
    return [
        export_task_from_merged(path, root / f"task_{k}") and root / f"task_{k}"
        for k, path in enumerate(family.merged)
    ]


def _codes_and_scales(model):
    """Every quantized weight's inner tensors except the zeros (scales of int4 storages
    are the first plane of scale_and_zero)."""
    kept = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "scale_and_zero"):
            kept[key] = (value.qdata.clone(), value.scale_and_zero[..., 0].clone())
        elif hasattr(value, "zero_point"):
            kept[key] = (value.qdata.clone(), value.scale.clone())
    return kept


@pytest.mark.parametrize("bits, group_size, dtype, double_quant, merged_format", STORAGES)
def test_switched_base_is_bitwise_each_tasks_merged_model(
    tmp_path, bits, group_size, dtype, double_quant, merged_format
):
    family = make_family(tmp_path, bits, group_size, 3, dtype, double_quant, merged_format=merged_format)
    packages = _packages(family, tmp_path)
    model = qalora_tune.load_merged(family.base, task=packages[1])
    assert current_task(model)["name"] == "task_1"
    assert_same_model(model, qalora_tune.load_merged(family.merged[1]))
    kept = _codes_and_scales(model)
    tokens = torch.randint(3, 57, (2, 16))
    owns = {k: qalora_tune.load_merged(path) for k, path in enumerate(family.merged)}
    for k in (0, 2, 1, 0, 2):
        info = model.load_task(packages[k])
        assert info["layers"] == 15 and not info["fingerprint_computed"]
        own = owns[k]
        assert_same_model(model, own)
        with torch.no_grad():
            assert torch.equal(model(tokens), own(tokens))
        after = _codes_and_scales(model)
        assert all(torch.equal(a, b) for key in kept for a, b in zip(kept[key], after[key]))
    # the task-free base is a package too: back to the model as loaded
    export_task_from_merged(family.base, tmp_path / "none")
    model.load_task(tmp_path / "none")
    assert_same_model(model, qalora_tune.load_merged(family.base))


@pytest.mark.parametrize("bits, group_size, dtype, double_quant, merged_format", [
    pytest.param(4, 32, torch.float32, False, "intx", id="int4-intx"),
    pytest.param(3, 32, torch.bfloat16, True, "intx", id="3bit-8bit-scales-bf16-intx"),
    pytest.param(8, 32, torch.float32, False, "intx", id="8bit-intx"),
    pytest.param(4, 32, torch.bfloat16, False, "int4_plain", id="int4-plain"),
    pytest.param(4, 32, torch.float32, False, "int4_tile_packed", id="int4-tile"),
])
def test_packages_from_memory_and_from_files_are_the_same(
    tmp_path, bits, group_size, dtype, double_quant, merged_format
):
    family = make_family(tmp_path, bits, group_size, 1, dtype, double_quant, merged_format=merged_format)
    from_memory = export_task(
        family.models[0], tmp_path / "mem", key_map=KEY_MAP, hf_config=CONFIG,
        merged_format=merged_format,
    )
    from_files = export_task_from_merged(family.merged[0], tmp_path / "files")
    assert from_memory["base"] == from_files["base"]
    assert from_memory["layers"] == from_files["layers"]
    a, b = read_task_package(tmp_path / "mem"), read_task_package(tmp_path / "files")
    assert a.zeros.keys() == b.zeros.keys()
    assert all(torch.equal(a.zeros[k], b.zeros[k]) for k in a.zeros)
    expected = {"intx": torch.float32, "int4_plain": dtype, "int4_tile_packed": torch.bfloat16}
    assert {z.dtype for z in a.zeros.values()} == {expected[merged_format]}
    # a model from load_merged exports its own table without being told its keys; the
    # fingerprint (codes and scale values) is the files', and switching to it is exact
    loaded = qalora_tune.load_merged(family.merged[0])
    export_task(loaded, tmp_path / "loaded")
    c = read_task_package(tmp_path / "loaded")
    assert c.base["fingerprint"] == b.base["fingerprint"]
    model = qalora_tune.load_merged(family.base, task=tmp_path / "loaded")
    assert_same_model(model, loaded)
    model.load_task(tmp_path / "files")
    assert_same_model(model, loaded)


def _as_intx(model):
    """The same model with every int4 weight in torchao's intx storage, converted the way
    a merged writer converts a base (``to_torchao_intx``: ``zp = -z / s`` in float64)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            gq = from_torchao_int4(module.weight)
            gq = type(gq)(gq.qdata, gq.scale, gq.zero, gq.group_size, module.bits)
            intx = to_torchao_intx(gq.as_int4(), dtype=module.weight.dtype)
            module.weight = torch.nn.Parameter(intx, requires_grad=False)
    return model


def test_int4_table_applied_to_intx_storage_equals_the_writers_conversion(tmp_path):
    family = make_family(tmp_path, 4, 32, 2)
    packages = _packages(family, tmp_path)
    model = _as_intx(qalora_tune.load_merged(family.base))
    assert all(
        is_intx_weight(m.weight) for m in model.modules() if isinstance(m, QuantizedLinear)
    )
    model.load_task(packages[1])
    reference = _as_intx(qalora_tune.load_merged(family.merged[1]))
    assert_same_model(model, reference)


def test_fingerprint_is_kept_until_a_weight_is_replaced(tmp_path, monkeypatch):
    family = make_family(tmp_path, 4, 32, 2)
    packages = _packages(family, tmp_path)
    model = qalora_tune.load_merged(family.base)
    assert model.load_task(packages[0])["fingerprint_computed"]
    fingerprint = model_fingerprint(model)
    assert fingerprint == read_task_package(packages[0]).base["fingerprint"]

    def no_codes(*args, **kwargs):  # a switch reads the table and the zeros, never a code
        raise AssertionError("a cached switch must not unpack codes")

    monkeypatch.setattr(switch_module, "canonical_layer", no_codes)
    info = model.load_task(packages[1])
    assert not info["fingerprint_computed"] and info["zero_point_bytes"] == sum(
        z.numel() * z.element_size() for z in read_task_package(packages[1]).zeros.values()
    )
    monkeypatch.undo()
    layer = model.layers[0].attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.to(torch.float32), requires_grad=False)
    assert model.load_task(packages[0])["fingerprint_computed"]


def _refused(model, package, *phrases):
    before = zeros_snapshot(model)
    with pytest.raises(ValueError) as error:
        model.load_task(package)
    message = str(error.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, message
    after = zeros_snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
    return message


def test_a_table_of_another_base_or_model_is_refused_and_nothing_changes(tmp_path):
    family = make_family(tmp_path / "a", 4, 32, 1)
    other = make_family(tmp_path / "b", 4, 32, 1, seed=1)  # same shapes, other weights
    mine = _packages(family, tmp_path / "a")[0]
    theirs = _packages(other, tmp_path / "b")[0]
    model = qalora_tune.load_merged(family.base, task=mine)
    message = _refused(model, theirs, str(theirs), str(family.base), "fingerprint")
    assert "other codes or scales" in message
    # another model: a table whose config essentials differ
    package = read_task_package(mine)
    package.base["config"]["hidden_size"] = 256
    _refused(model, package, "another model", "hidden_size=256")
    # another group size / bit width (a table of the 2-bit quantization of the same weights)
    two_bit = make_family(tmp_path / "c", 2, 32, 1)
    _refused(model, _packages(two_bit, tmp_path / "c")[0], "bits=2")
    # a table for a base stored in another dtype
    bf16 = make_family(tmp_path / "d", 4, 32, 1, torch.bfloat16)
    _refused(model, _packages(bf16, tmp_path / "d")[0], "fingerprint", "dtype")
    # wrong shapes and missing layers in a package that is itself consistent
    package = read_task_package(mine)
    key = "model.layers.0.self_attn.q_proj.weight"
    package.zeros[key] = package.zeros[key][:, :2]
    _refused(model, package, key, "(128, 2)")
    package = read_task_package(mine)
    del package.zeros[key]
    _refused(model, package, "no zero points for", key)
    assert current_task(model)["name"] == "task_0"


def test_a_table_whose_zeros_overflow_the_storage_is_refused_before_any_write(tmp_path):
    family = make_family(tmp_path, 8, 32, 1)  # intx: zp = -z / s
    package = read_task_package(_packages(family, tmp_path)[0])
    model = qalora_tune.load_merged(family.base)
    last = sorted(package.zeros)[-1]
    package.zeros[last] = package.zeros[last] * 1e300  # finite in float64, inf in fp32
    _refused(model, package, last, "overflow")


def test_models_with_live_adapters_or_without_key_map_are_refused(tmp_path):
    family = make_family(tmp_path, 4, 32, 1)
    package = _packages(family, tmp_path)[0]
    training_model = build(plain_weights(), 4, 32, adapters=True)
    with pytest.raises(ValueError, match="enable_task_switching"):
        load_task(training_model, package)
    enable_task_switching(training_model, KEY_MAP, CONFIG)
    with pytest.raises(ValueError, match="QA-LoRA layer with its own adapter"):
        training_model.load_task(package)
    # a QuantizedLinear model switched by hand to the table of a merged model in memory:
    # the same zeros as that model
    merged = merge_random_adapters(build(plain_weights(), 4, 32, adapters=True), seed=1000)
    export_task(merged, tmp_path / "in_memory", key_map=KEY_MAP, hf_config=CONFIG)
    plain_model = enable_task_switching(build(plain_weights(), 4, 32, adapters=False), KEY_MAP, CONFIG)
    plain_model.load_task(tmp_path / "in_memory")
    for name, module in plain_model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(
                stored_zero_points(module.weight),
                stored_zero_points(merged.get_submodule(name).weight),
            ), name


def test_sharded_merged_directories_export_and_switch_exactly(tmp_path):
    from qalora_tune.checkpointing import write_merged_int4

    weights = plain_weights()
    spec = {"model": {"_component_": "qalora_tune.tiny.qalora_tiny_llama", "lora_attn_modules": [],
                      "group_size": 32, "bits": 4}, "model_type": "LLAMA2"}
    base, task = tmp_path / "base", tmp_path / "merged"
    for path, model in ((base, build(weights, 4, 32, False)),
                        (task, merge_random_adapters(build(weights, 4, 32, True), seed=7))):
        path.mkdir()
        write_merged_int4(model, path, KEY_MAP, CONFIG, spec, "intx", max_shard_size="100KB")
    assert len(list(task.glob("*.safetensors"))) > 1  # shards with an index
    export_task_from_merged(task, tmp_path / "task", base_dir=base)
    model = qalora_tune.load_merged(base, task=tmp_path / "task")
    assert_same_model(model, qalora_tune.load_merged(task))
