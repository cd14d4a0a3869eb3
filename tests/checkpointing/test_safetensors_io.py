"""safetensors read with pread and written as Hugging Face shards, against the official
``safetensors`` reader."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qalora_tune.checkpointing import (
    SAFETENSORS_INDEX_NAME,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    safetensors_files,
)
from qalora_tune.checkpointing._safetensors_io import iter_safetensors, parse_size


def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"w{i}": torch.randn(16 * i + 3, generator=generator).to(torch.bfloat16)
               for i in range(12)}
    tensors["codes"] = torch.randint(-8, 8, (5, 7), dtype=torch.int8, generator=generator)
    tensors["bytes"] = torch.arange(11, dtype=torch.uint8)
    tensors["empty"] = torch.empty(0, 4)
    tensors["f32"] = torch.randn(3, 4, generator=generator)
    return tensors


def _write(directory, tensors, max_shard_size, **kwargs):
    writer = ShardedSafetensorsWriter(directory, max_shard_size, metadata={"format": "pt"}, **kwargs)
    for name, tensor in tensors.items():
        writer.add({name: tensor}, {f"{name}.note": name.upper()})
    return writer.close(metadata={"names": json.dumps(list(tensors))})


@pytest.mark.parametrize("reserve", [1 << 20, 64], ids=["header_in_place", "header_copied"])
def test_shards_read_back_with_safetensors_and_index_like_hugging_face(tmp_path, reserve):
    tensors = _tensors()
    paths = _write(tmp_path, tensors, max_shard_size=200, header_reserve=reserve)
    count = len(paths)
    assert count > 3
    assert [p.name for p in paths] == [f"model-{i:05d}-of-{count:05d}.safetensors"
                                       for i in range(1, count + 1)]
    index = json.loads((tmp_path / SAFETENSORS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    read = {}
    for path in paths:
        shard = load_file(str(path))
        assert all(index["weight_map"][name] == path.name for name in shard)
        # each shard holds at most max_shard_size bytes, unless one tensor is larger
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 200 or len(shard) == 1
        read.update(shard)
        with safe_open(str(path), framework="pt") as handle:  # every shard: all metadata
            metadata = handle.metadata()
        assert metadata["format"] == "pt" and json.loads(metadata["names"]) == list(tensors)
        assert all(metadata[f"{name}.note"] == name.upper() for name in tensors)
    assert set(read) == set(tensors)
    assert all(torch.equal(read[name], tensor) for name, tensor in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in paths] + [SAFETENSORS_INDEX_NAME])  # no partial file left


def test_a_large_shard_gets_its_header_in_place_padded_with_spaces(tmp_path):
    big = {"a": torch.ones(1 << 18), "b": torch.zeros(1 << 18)}  # 2 MiB of data
    (path,) = _write(tmp_path, big, max_shard_size="1GB", header_reserve=4096)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length == 4096 - 8 and raw[8:8 + length].rstrip(b" ").endswith(b"}")
    read = load_file(str(path))
    assert torch.equal(read["a"], big["a"]) and torch.equal(read["b"], big["b"])


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    paths = _write(tmp_path, _tensors(), max_shard_size="5GB")
    assert [p.name for p in paths] == ["model.safetensors"]
    assert not (tmp_path / SAFETENSORS_INDEX_NAME).exists()
    assert safetensors_files(tmp_path) == paths


def test_tensors_added_together_share_a_shard(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_size=100)
    writer.add({"x": torch.zeros(20)})  # 80 bytes
    writer.add({"y._weight_qdata": torch.zeros(20), "y._weight_scale": torch.zeros(5)})
    writer.close()
    weight_map = json.loads((tmp_path / SAFETENSORS_INDEX_NAME).read_text())["weight_map"]
    assert weight_map["y._weight_qdata"] == weight_map["y._weight_scale"] != weight_map["x"]


def test_start_shard_forces_a_new_file(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_size="1GB")
    writer.add({"x": torch.zeros(2)})
    writer.start_shard()
    writer.add({"y": torch.zeros(2)})
    assert len(writer.close()) == 2


def test_a_name_written_twice_is_refused(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path)
    writer.add({"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="'x' is written twice"):
        writer.add({"x": torch.zeros(2)})


def test_the_reader_reads_files_safetensors_wrote(tmp_path):
    tensors = _tensors(1)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"k": "v"})
    with SafetensorsReader(tmp_path / "model.safetensors") as reader:
        assert reader.metadata() == {"k": "v"}
        assert set(reader.keys()) == set(tensors)
    read = dict(iter_safetensors(tmp_path / "model.safetensors"))
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


@pytest.mark.parametrize("keep", [0.6, 0.001])
def test_the_reader_refuses_a_truncated_file(tmp_path, keep):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(ValueError):
        SafetensorsReader(path)


@pytest.mark.parametrize(
    "size, expected",
    [(1000, 1000), ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("10 kb", 10**4)],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["big", 0, "-1GB", "5XB"])
def test_parse_size_refuses_names_the_setting(size):
    with pytest.raises(ValueError, match="checkpointer.max_shard_size="):
        parse_size(size, "checkpointer.max_shard_size")
