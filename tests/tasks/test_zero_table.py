"""Task packages on disk: what is written, read back, and every damaged or hostile package
refused in one line naming it."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qalora_tune.tasks import (
    TASK_METADATA_NAME,
    TASK_ZEROS_NAME,
    export_task_from_merged,
    read_task_package,
)
from tests.tasks.family import CONFIG, make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    family = make_family(root, bits=4, group_size=32, tasks=2)
    export_task_from_merged(family.merged[0], root / "task")
    return family, root / "task"


def _copy(package, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for entry in package.iterdir():
        (target / entry.name).write_bytes(entry.read_bytes())
    return target


def test_package_holds_every_layers_zeros_in_hf_order_and_its_base(family):
    family, package = family
    meta = json.loads((package / TASK_METADATA_NAME).read_text())
    assert meta["format"] == "qalora-tune zero-point table" and meta["format_version"] == 1
    assert meta["name"] == "task" and meta["zero_dtype"] == "float32"
    base = meta["base"]  # the default merged format on CPU: intx, zeros kept as zp = -z / s
    assert base["group_size"] == 32 and base["bits"] == 4 and base["storage"] == "intx"
    assert base["fingerprint"].startswith("sha256:") and len(base["fingerprint"]) == 71
    assert base["config"]["hidden_size"] == CONFIG["hidden_size"]
    assert base["config"]["num_hidden_layers"] == CONFIG["num_hidden_layers"]
    zeros = load_file(str(package / TASK_ZEROS_NAME))
    # 2 layers x (q, k, v, o, gate, up, down) + the untied output projection
    assert len(zeros) == 15 and set(zeros) == set(meta["layers"])
    assert zeros["model.layers.0.mlp.down_proj.weight"].shape == (128, 8)  # 256 inputs / 32
    assert zeros["lm_head.weight"].shape == (57, 4)
    # zero points only: 4 bytes per group of 32 weights = 1 bit per weight in fp32 (the intx
    # merged model: 8-bit codes and fp32 scales and zeros, 10 bits per weight)
    size = meta["size"]
    assert size["bits_per_quantized_parameter"] == pytest.approx(32 / 32)
    assert size["zero_point_bytes"] == sum(z.numel() * 4 for z in zeros.values())
    assert size["file_bytes"] == (package / TASK_ZEROS_NAME).stat().st_size
    merged_bytes = (family.merged[0] / "model.safetensors").stat().st_size
    assert size["file_bytes"] < merged_bytes / 8
    # rows in Hugging Face order: the merged file's own zero points, as stored
    from safetensors import safe_open

    with safe_open(str(family.merged[0] / "model.safetensors"), "pt") as handle:
        stored = handle.get_tensor("model.layers.1.self_attn.k_proj._weight_zero_point")
    assert torch.equal(zeros["model.layers.1.self_attn.k_proj.weight"], stored)


def _damage_zeros(package, change):
    zeros = load_file(str(package / TASK_ZEROS_NAME))
    change(zeros)
    save_file(zeros, str(package / TASK_ZEROS_NAME))


def _damage_json(package, change):
    meta = json.loads((package / TASK_METADATA_NAME).read_text())
    change(meta)
    (package / TASK_METADATA_NAME).write_text(json.dumps(meta))


KEY = "model.layers.0.self_attn.q_proj.weight"


def _set(key, value):
    def change(meta):
        meta[key] = value
    return change


def _set_base(key, value):
    def change(meta):
        meta["base"][key] = value
    return change


HOSTILE = [
    ("truncated", lambda p: (p / TASK_ZEROS_NAME).write_bytes((p / TASK_ZEROS_NAME).read_bytes()[:1000]),
     "truncated or corrupt"),
    ("nan", lambda p: _damage_zeros(p, lambda z: z[KEY].__setitem__((0, 0), float("nan"))),
     "NaN or infinite"),
    ("inf", lambda p: _damage_zeros(p, lambda z: z[KEY].__setitem__((3, 1), float("inf"))),
     "NaN or infinite"),
    ("shape", lambda p: _damage_zeros(p, lambda z: z.__setitem__(KEY, z[KEY][:, :3].contiguous())),
     "task.json says (128, 4)"),
    ("dtype", lambda p: _damage_zeros(p, lambda z: z.__setitem__(KEY, z[KEY].double())),
     "task.json says float32"),
    ("missing layer", lambda p: _damage_zeros(p, lambda z: z.pop(KEY)), f"lacks {KEY}"),
    ("extra layer", lambda p: _damage_zeros(p, lambda z: z.__setitem__("evil.weight", torch.zeros(2, 2))),
     "evil.weight"),
    ("not json", lambda p: (p / TASK_METADATA_NAME).write_text("{not json"), "not valid JSON"),
    ("json list", lambda p: (p / TASK_METADATA_NAME).write_text("[1, 2]"), "not an object"),
    ("format", lambda p: _damage_json(p, _set("format", "pickle")), "is not a"),
    ("version", lambda p: _damage_json(p, _set("format_version", 99)), "format_version=99"),
    ("name", lambda p: _damage_json(p, _set("name", ["x"])), "not a task name"),
    ("zero dtype", lambda p: _damage_json(p, _set("zero_dtype", "object")), "zero_dtype='object'"),
    ("fingerprint", lambda p: _damage_json(p, _set_base("fingerprint", "md5:1")), "fingerprint 'md5:1'"),
    ("group size", lambda p: _damage_json(p, _set_base("group_size", -32)), "group_size=-32"),
    ("bits", lambda p: _damage_json(p, _set_base("bits", 5)), "bits=5"),
    ("layers", lambda p: _damage_json(p, _set("layers", {KEY: {"zero_shape": [128, "4"]}})), "zero_shape"),
    ("no zeros", lambda p: (p / TASK_ZEROS_NAME).unlink(), f"lacks {TASK_ZEROS_NAME}"),
    ("no json", lambda p: (p / TASK_METADATA_NAME).unlink(), "not found"),
]


@pytest.mark.parametrize("change, phrase", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_damaged_packages_are_refused_in_one_line_naming_them(family, tmp_path, change, phrase):
    package = _copy(family[1], tmp_path)
    change(package)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        read_task_package(package)
    message = str(error.value)
    assert "\n" not in message and str(package) in message and phrase in message, message


def test_a_zeros_file_linked_from_elsewhere_is_refused(family, tmp_path):
    package = _copy(family[1], tmp_path)
    outside = tmp_path / "outside.safetensors"
    (package / TASK_ZEROS_NAME).rename(outside)
    os.symlink(outside, package / TASK_ZEROS_NAME)
    with pytest.raises(ValueError, match="not a regular file inside the package"):
        read_task_package(package)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_task_package(tmp_path / "nowhere")


def test_export_refuses_other_files_replaces_only_with_overwrite_and_checks_the_base(family, tmp_path):
    family, _ = family
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write"):
        export_task_from_merged(family.merged[0], foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    target = tmp_path / "t"
    export_task_from_merged(family.merged[0], target)
    with pytest.raises(ValueError, match="overwrite=True"):
        export_task_from_merged(family.merged[1], target)
    meta = export_task_from_merged(family.merged[1], target, name="second", overwrite=True)
    assert read_task_package(target).name == "second" == meta["name"]
    # a base of other weights: refused, nothing written
    other = make_family(tmp_path / "other", 4, 32, 1, seed=3)
    with pytest.raises(ValueError, match="another base; nothing written"):
        export_task_from_merged(family.merged[0], tmp_path / "x", base_dir=other.base)
    assert not (tmp_path / "x").exists()
    export_task_from_merged(family.merged[0], tmp_path / "y", base_dir=family.base)
    assert read_task_package(tmp_path / "y").base["fingerprint"] == meta["base"]["fingerprint"]
