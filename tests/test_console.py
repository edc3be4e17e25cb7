"""Console output: rank 0's progress lines / bar (ssl_platform.training.progress) and the wait-for-resources notice."""

from __future__ import annotations

import io
import re
import time

import pytest

from ssl_platform.training.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_step_lines_have_epoch_step_loss_images_per_sec_and_eta():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("run-a", epochs=3, steps_per_epoch=10, stream=out, clock=clock)
    assert not p.is_terminal
    p.start_epoch(1)
    clock.t += 5.0  # 5 steps of 16 images in 5 s
    p.update(1, 5, 0.123456, images_seen=80, lr=1e-3)
    line = out.getvalue().splitlines()[-1]
    # 25 of 30 steps left at 1 s per step
    assert line == "[run-a] epoch 1/3 step 5/10 loss 0.1235 lr 1.0e-03 | 16 img/s | ETA 25s", line
    clock.t += 5.0
    p.update(1, 10, 0.1, images_seen=160)
    p.end_epoch(1, {"loss": 0.11, "images_per_sec": 16.0, "epoch_time_s": 10.0, "knn_top1": 0.5})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[-1] == "[run-a] epoch 1/3 done in 10.0s: loss 0.1100, 16 img/s, knn_top1 0.5000 | ETA 20s", lines[-1]
    p.start_epoch(3)
    p.end_epoch(3, {"loss": 0.1})
    assert out.getvalue().splitlines()[-1].endswith("| last epoch")


def test_resumed_run_eta_counts_only_this_processes_steps():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("r", epochs=4, steps_per_epoch=10, start_epoch=2, stream=out, clock=clock)
    clock.t += 2.0
    p.update(3, 2, 1.0, images_seen=2)  # 2 steps in 2 s since start, 18 left
    assert out.getvalue().strip().endswith("ETA 18s")


def test_terminal_gets_one_bar_redrawn_in_place_and_a_newline_before_the_summary():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("run-b", epochs=2, steps_per_epoch=4, stream=out, is_terminal=True, clock=clock)
    for step in (1, 2, 3, 4):
        clock.t += 1.0
        p.update(1, step, 0.5, images_seen=8 * step)
    text = out.getvalue()
    assert text.count("\r") == 4 and "\n" not in text
    assert "|" + "#" * 24 + "|" in text and "4/4" in text
    p.end_epoch(1, {"loss": 0.5})
    assert out.getvalue().endswith("| ETA 4s\n") and "\n[run-b] epoch 1/2 done" in out.getvalue()


def test_a_long_epoch_gets_a_line_within_ten_steps_then_every_30_s():
    """12,500 steps per epoch (200k images at batch 16): the quarter-epoch lines alone would be 3,125 steps apart."""
    clock, out = FakeClock(), io.StringIO()
    p = Progress("long", epochs=1, steps_per_epoch=12_500, stream=out, clock=clock)
    due = []
    for step in range(1, 200):
        clock.t += 1.0
        if p.line_due(1, step):
            due.append(step)
            p.update(1, step, 0.5, images_seen=16 * step)
    assert due[0] == 10  # within the first 10 steps, at 1 s per step
    assert due[1:] == [40, 70, 100, 130, 160, 190]  # then every 30 s
    assert len(out.getvalue().splitlines()) == len(due)


def test_slow_steps_get_their_first_line_by_time():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("slow", epochs=1, steps_per_epoch=1000, stream=out, clock=clock)
    clock.t += 31.0  # one 31 s step (start-up)
    assert p.line_due(1, 1)


def test_eta_is_not_stretched_by_a_slow_first_step():
    """A 100 s first step (worker set-up, first decode), then 1 s per step: after 20 steps, 980 s are left."""
    clock, out = FakeClock(), io.StringIO()
    p = Progress("eta", epochs=1, steps_per_epoch=1000, stream=out, clock=clock)
    clock.t += 100.0
    p.line_due(1, 1)
    for step in range(2, 21):
        clock.t += 1.0
        p.line_due(1, step)
    p.update(1, 20, 0.5, images_seen=320)
    assert out.getvalue().strip().endswith("ETA 16m20s"), out.getvalue()  # 980 s, not 980 * 119 / 20 s


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (75, "1m15s"), (4000, "1h06m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_pending_placement_group_is_announced_with_request_and_cluster(ray_session):
    """A STRICT_SPREAD group of 2 cannot be placed on this single-node instance: the notice names both sides."""
    from ray.util import placement_group, remove_placement_group

    from ssl_platform.training.resource_wait import ResourceWaitNotice

    bundle = {"CPU": 0.25, "custom_test_wait": 0.0}
    pg = placement_group([{"CPU": 0.25}] * 2, strategy="STRICT_SPREAD")
    out = io.StringIO()
    try:
        with ResourceWaitNotice(bundle, 2, "STRICT_SPREAD", first_after_s=0.5, every_s=60, poll_s=0.2, out=out):
            deadline = time.monotonic() + 20
            while "waiting" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        remove_placement_group(pg)
    line = out.getvalue().splitlines()[0]
    assert re.search(r"waiting \d+s for resources: the run asks for 2 workers x \{CPU: 0\.25\}", line), line
    assert "placement STRICT_SPREAD: one worker per node" in line, line
    assert "the cluster has 1 alive node (1 large enough for a worker), CPU" in line, line
    assert "STRICT_SPREAD needs 2 nodes that each fit a worker" in line, line


def test_ray_train_report_dumps_are_dropped_but_warnings_kept():
    import logging

    from ray.train.v2._internal.execution import context

    from ssl_platform.training.progress import quiet_ray_train_logs

    before = context.logger.level
    try:
        context.logger.setLevel(logging.INFO)  # as a Train worker's logging config leaves it
        quiet_ray_train_logs()
        assert not context.logger.isEnabledFor(logging.INFO) and context.logger.isEnabledFor(logging.WARNING)
    finally:
        context.logger.setLevel(before)
