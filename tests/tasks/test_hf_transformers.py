"""Task packages in transformers: ``from_pretrained`` the base, overwrite its zero points
through the state dict, and get the task's own merged model bit for bit."""

import pytest
import torch
from safetensors.torch import load_file

from qalora_tune.tasks import TASK_ZEROS_NAME, export_task_from_merged, load_task_into_transformers
from tests.tasks.family import make_family

transformers = pytest.importorskip("transformers")


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _zero_points(model):
    return {
        k: v.zero_point.clone() for k, v in model.state_dict().items() if hasattr(v, "zero_point")
    }


@pytest.mark.parametrize("bits", [4, 8])
@torch.no_grad()
def test_transformers_base_with_a_task_equals_the_tasks_merged_model(tmp_path, bits):
    family = make_family(tmp_path, bits, 32, 2)  # intx files: what stock torchao runs on CPU
    packages = []
    for k, path in enumerate(family.merged):
        export_task_from_merged(path, tmp_path / f"task_{k}")
        packages.append(tmp_path / f"task_{k}")
    model = _load(family.base)
    tokens = torch.randint(3, 57, (2, 16))
    model(tokens)
    for k in (1, 0, 1):
        assert load_task_into_transformers(model, packages[k])["layers"] == 15
        own = _load(family.merged[k])
        mine, theirs = _zero_points(model), _zero_points(own)
        assert mine.keys() == theirs.keys() and len(mine) == 15
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
        assert torch.equal(model(tokens).logits, own(tokens).logits)

    # the documented recipe by hand: the state dict's parameters, zero points overwritten
    by_hand = _load(family.base)
    by_hand(tokens)
    state = by_hand.state_dict(keep_vars=True)
    for key, zero in load_file(str(packages[0] / TASK_ZEROS_NAME)).items():
        state[key].zero_point.copy_(zero)  # IntxUnpackedToInt8Tensor's zp, as the table holds it
    assert torch.equal(by_hand(tokens).logits, _load(family.merged[0])(tokens).logits)


def test_a_package_of_another_base_changes_nothing(tmp_path):
    family = make_family(tmp_path / "a", 4, 32, 1)
    other = make_family(tmp_path / "b", 4, 32, 1, seed=2)
    export_task_from_merged(other.merged[0], tmp_path / "theirs")
    model = _load(family.base)
    before = _zero_points(model)
    with pytest.raises(ValueError, match="fingerprint") as error:
        load_task_into_transformers(model, tmp_path / "theirs")
    assert "\n" not in str(error.value) and str(tmp_path / "theirs") in str(error.value)
    after = _zero_points(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
