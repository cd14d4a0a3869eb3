"""The format-independent streaming helpers: reading tensors one at a time, and naming the
key layout a checkpoint uses."""

import pytest
import torch
from safetensors.torch import save_file

from qalora_tune.checkpointing._streaming import (
    guess_key_format,
    iter_checkpoint_tensors,
)


@pytest.mark.parametrize(
    "keys,expected",
    [
        (["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"], "hf"),
        (["lm_head.weight"], "hf"),
        (["rope.freqs", "layers.3.attention.wq.weight"], "meta"),
        (["norm.weight"], "meta"),
        (["layers.0.attn.q_proj.weight"], "torchtune"),
        (["norm.scale"], "torchtune"),
        (["tok_embeddings.weight", "output.weight"], None),  # shared by meta and torchtune
        (["vision_tower.patch_embed.weight"], None),
    ],
)
def test_guess_key_format(keys, expected):
    assert guess_key_format(keys) == expected


@pytest.mark.parametrize("name,wrapped", [("a.pt", False), ("a.pt", True), ("a.safetensors", False)])
def test_iter_checkpoint_tensors_reads_every_file_and_unwraps_model(tmp_path, name, wrapped):
    first = {"x": torch.arange(3.0), "y": torch.ones(2, 2)}
    if name.endswith(".safetensors"):
        save_file(first, str(tmp_path / name))
    else:
        torch.save({"model": first} if wrapped else first, tmp_path / name)
    torch.save({"z": torch.zeros(1)}, tmp_path / "b.pth")
    read = dict(iter_checkpoint_tensors([tmp_path / name, tmp_path / "b.pth"]))
    assert list(read) == ["x", "y", "z"]
    assert torch.equal(read["y"], first["y"])


def test_iter_checkpoint_tensors_refuses_a_pickle_that_is_not_a_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "model.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        list(iter_checkpoint_tensors([tmp_path / "model.pt"]))


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
@pytest.mark.parametrize("keep", [0.9, 0.01], ids=["data_cut", "header_cut"])
def test_a_truncated_file_is_a_one_line_value_error_naming_it(tmp_path, name, keep):
    tensors = {"x": torch.randn(256), "y": torch.randn(64, 64)}
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError) as error:
        list(iter_checkpoint_tensors([path]))
    message = str(error.value)
    assert message.startswith(f"{path} cannot be read (") and "\n" not in message
    assert "truncated or corrupt" in message and "checkpointer.checkpoint_dir" in message


def test_a_missing_file_keeps_its_own_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_checkpoint_tensors([tmp_path / "absent.safetensors"]))
