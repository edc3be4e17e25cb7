"""The worker loop's step without Ray: device-side skip of non-finite steps, device sums, bad-data verdicts."""

from __future__ import annotations

import pytest
import torch

from ssl_platform.training.hooks import StepInfo
from ssl_platform.training.trainer import (
    NonFiniteLossError,
    _check_bad_data,
    _check_nonfinite,
    _DeviceSums,
    local_worker,
    train_step,
)
from tests.fault_hooks import PoisonLoss


def _setup(tiny_spec, hooks):
    """A one-process worker (64 images, batch 16: 4 steps per epoch) and its first batch."""
    worker, data, training = local_worker(tiny_spec(), step_hooks=hooks)
    return worker, data, training, next(data.train(0))


def _info(step: int) -> StepInfo:
    return StepInfo("t", 0, 0, step, 4, step)


def test_a_non_finite_step_is_skipped_on_the_device(tiny_spec):
    worker, data, training, batch = _setup(tiny_spec, [PoisonLoss(at_step=0)])
    before = {k: v.clone() for k, v in training.method.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    loss, metrics, skipped = train_step(worker, data, training, batch, gen, _info(0), 0.0)
    assert float(skipped) == 1.0 and not torch.isfinite(loss)
    after = training.method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # AdamW left every weight as it was
    assert all(float(s["step"]) == 0 for s in training.optimizer.state.values())  # nor counted the step

    training.global_step = 1
    loss, _, skipped = train_step(worker, data, training, batch, gen, _info(1), 0.25)
    assert float(skipped) == 0.0 and torch.isfinite(loss)
    after = training.method.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_device_sums_average_finite_steps_and_name_the_first_skip(tiny_spec):
    worker, _, training, _ = _setup(tiny_spec, [])
    sums = _DeviceSums(torch.device("cpu"))
    sums.add(torch.tensor(2.0), {"loss_x": torch.tensor(1.0)}, torch.tensor(0.0), 0)
    sums.add(torch.tensor(float("nan")), {"loss_x": torch.tensor(float("nan"))}, torch.tensor(1.0), 1)
    sums.add(torch.tensor(4.0), {"loss_x": torch.tensor(3.0)}, torch.tensor(0.0), 2)
    read = sums.read()
    assert read["loss"] == 3.0 and read["loss_x"] == 2.0 and read["skipped"] == 1 and read["first_skipped"] == 1
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradients at step 1 \(epoch 1\) of method 'mae'"):
        _check_nonfinite(worker, training, read, skipped_before=0, steps_per_epoch=4)
    worker.spec.optim.max_nonfinite_skips = 1
    assert _check_nonfinite(worker, training, read, skipped_before=0, steps_per_epoch=4) is read
    assert training.skipped_steps == 1


def test_bad_data_verdict_waits_for_enough_files():
    from ssl_platform.data.streaming import BadDataError

    _check_bad_data(1, 8, ["a.jpg"], 0.01, epoch_end=False)  # 1 of 8: no verdict before 100 files
    with pytest.raises(BadDataError, match=r"got 2 undecodable of 100 .*a.jpg"):
        _check_bad_data(2, 100, ["a.jpg", "b.jpg"], 0.01, epoch_end=False)
    with pytest.raises(BadDataError):
        _check_bad_data(1, 8, ["a.jpg"], 0.01, epoch_end=True)
    with pytest.raises(BadDataError):
        _check_bad_data(1, 8, ["a.jpg"], 0.0, epoch_end=False)  # zero tolerance: the first bad file stops
    _check_bad_data(1, 200, ["a.jpg"], 0.01, epoch_end=True)
