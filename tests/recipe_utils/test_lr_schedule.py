"""get_cosine_schedule_with_floor: warmup, cosine to a floor, torchtune's at floor 0, resume."""

import math

import pytest
import torch
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from qalora_tune.recipe_utils import get_cosine_schedule_with_floor


def _lrs(make, steps, lr=0.5):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = make(optimizer)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return values


def test_warmup_then_cosine_down_to_the_floor_and_held():
    lrs = _lrs(lambda o: get_cosine_schedule_with_floor(o, 4, 20, min_lr_ratio=0.1), 30)
    assert lrs[:5] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    middle = 4 + (20 - 4) // 2
    assert lrs[middle] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after warmup
    assert lrs[20:] == pytest.approx([0.05] * 10)


def test_floor_zero_is_torchtunes_schedule():
    ours = _lrs(lambda o: get_cosine_schedule_with_floor(o, 3, 17, min_lr_ratio=0.0), 17)
    theirs = _lrs(lambda o: get_cosine_schedule_with_warmup(o, 3, 17), 17)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_state_dict_resumes_the_schedule():
    full = _lrs(lambda o: get_cosine_schedule_with_floor(o, 2, 12, min_lr_ratio=0.2), 12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    first = get_cosine_schedule_with_floor(optimizer, 2, 12, min_lr_ratio=0.2)
    for _ in range(5):
        optimizer.step()
        first.step()
    # as the recipe resumes: build both, then load the optimizer's state and the schedule's
    again = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    second = get_cosine_schedule_with_floor(again, 2, 12, min_lr_ratio=0.2)
    again.load_state_dict(optimizer.state_dict())
    second.load_state_dict(first.state_dict())
    assert again.param_groups[0]["lr"] == pytest.approx(full[5])
    assert math.isclose(second.get_last_lr()[0], full[5])


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_a_floor_outside_zero_one_is_refused(ratio):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with pytest.raises(ValueError, match="lr_scheduler.min_lr_ratio"):
        get_cosine_schedule_with_floor(optimizer, 1, 10, min_lr_ratio=ratio)
