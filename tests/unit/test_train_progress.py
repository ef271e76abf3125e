"""raypdm.train.progress without Ray: a fake board (its `update.remote` appends) and a fake clock."""

from __future__ import annotations

import pytest

from raypdm.train.progress import PUSH_INTERVAL_S, ProgressBoard, ProgressReporter


class _Method:
    def __init__(self, sink: list):
        self.sink = sink

    def remote(self, record):
        self.sink.append(record)


class FakeBoard:
    """What a Ray actor handle looks like to the reporter: `board.update.remote(record)`."""

    def __init__(self):
        self.records: list[dict] = []
        self.update = _Method(self.records)


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class CountingLoss:
    """A loss whose `float()` is counted: the reporter must read it only for the steps it sends."""

    def __init__(self, value: float):
        self.value, self.reads = value, 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


def _reporter(total=10, interval_s=1.0, attempt=1):
    board, clock = FakeBoard(), FakeClock()
    return ProgressReporter(board, "id000", total, attempt=attempt, interval_s=interval_s, clock=clock), board, clock


def test_default_interval_is_one_second():
    assert PUSH_INTERVAL_S == 1.0
    assert ProgressReporter(None, "x", 3).interval_s == 1.0


def test_start_sends_training_phase_with_start_step():
    reporter, board, _ = _reporter(total=50, attempt=2)
    reporter.start(7)
    assert len(board.records) == 1
    record = board.records[0]
    assert record["phase"] == "training"
    assert record["step"] == 7 and record["start_step"] == 7
    assert record["label"] == "id000" and record["total"] == 50 and record["attempt"] == 2
    assert isinstance(record["time"], float)


def test_steps_are_throttled_to_one_per_interval():
    reporter, board, clock = _reporter(total=100, interval_s=1.0)
    reporter.start(0)
    sent = []
    for step in range(1, 11):
        clock.advance(0.25)  # four steps a second
        sent.append(reporter.step(step, 0.5))
    # pushes at 1.0 s (step 4) and 2.0 s (step 8); the others are dropped
    assert sent == [False, False, False, True, False, False, False, True, False, False]
    assert [r["step"] for r in board.records[1:]] == [4, 8]
    assert all(r["phase"] == "training" for r in board.records)


def test_final_step_is_always_sent():
    reporter, board, clock = _reporter(total=3, interval_s=60.0)
    reporter.start(0)
    clock.advance(0.1)
    assert reporter.step(1, 1.0) is False
    clock.advance(0.1)
    assert reporter.step(2, 1.0) is False
    clock.advance(0.1)
    assert reporter.step(3, 0.25) is True  # step == total, although the interval has not passed
    assert [r.get("step") for r in board.records] == [0, 3]
    assert board.records[-1]["loss"] == 0.25
    assert board.records[-1]["eta_s"] == pytest.approx(0.0)


def test_rate_and_eta_from_the_clock():
    reporter, board, clock = _reporter(total=10, interval_s=1.0)
    reporter.start(0)
    clock.advance(1.0)
    assert reporter.step(1, 0.5)
    record = board.records[-1]
    assert record["s_per_step"] == pytest.approx(1.0)
    assert record["eta_s"] == pytest.approx(9.0)  # 1 s per step, 9 steps left
    assert reporter.seconds_per_step == pytest.approx(1.0)


def test_rate_is_smoothed_0_6_old_0_4_new():
    reporter, board, clock = _reporter(total=100, interval_s=1.0)
    reporter.start(0)
    clock.advance(2.0)
    reporter.step(1, 0.5)  # first measurement: 2 s/step, taken as is
    assert board.records[-1]["s_per_step"] == pytest.approx(2.0)
    clock.advance(4.0)
    reporter.step(5, 0.5)  # 4 steps in 4 s: 1 s/step -> 0.6 * 2 + 0.4 * 1 = 1.6
    assert board.records[-1]["s_per_step"] == pytest.approx(1.6)
    assert board.records[-1]["eta_s"] == pytest.approx(1.6 * 95)
    clock.advance(1.5)
    reporter.step(8, 0.5)  # 3 steps in 1.5 s: 0.5 s/step -> 0.6 * 1.6 + 0.4 * 0.5 = 1.16
    assert board.records[-1]["s_per_step"] == pytest.approx(1.16)
    assert board.records[-1]["eta_s"] == pytest.approx(1.16 * 92)


def test_throttled_steps_count_towards_the_rate():
    reporter, board, clock = _reporter(total=20, interval_s=1.0)
    reporter.start(0)
    for step in range(1, 5):
        clock.advance(0.5)
        reporter.step(step, 0.1)
    # pushes at step 2 (1.0 s for 2 steps) and step 4 (1.0 s for 2 steps): 0.5 s/step both times
    assert [r["step"] for r in board.records[1:]] == [2, 4]
    assert board.records[-1]["s_per_step"] == pytest.approx(0.5)
    assert board.records[-1]["eta_s"] == pytest.approx(0.5 * 16)


def test_step_without_start_measures_from_the_first_step():
    reporter, board, clock = _reporter(total=10, interval_s=1.0)
    assert reporter.step(1, 0.3) is False  # the first call only starts the clock
    assert board.records == []
    clock.advance(2.0)
    assert reporter.step(3, 0.3) is True
    record = board.records[-1]
    assert record["step"] == 3 and record["phase"] == "training"
    # (the rate counts step 1 as well: 2 s over steps 1..3; `start()` is the documented entry point)
    assert record["s_per_step"] > 0
    assert record["eta_s"] == pytest.approx(record["s_per_step"] * 7)


def test_phase_is_sent_at_once():
    reporter, board, clock = _reporter()
    reporter.start(0)
    clock.advance(0.01)
    reporter.phase("validation images", step=3)
    reporter.phase("exporting")
    assert [r["phase"] for r in board.records] == ["training", "validation images", "exporting"]
    assert board.records[1]["step"] == 3
    assert all(r["label"] == "id000" and r["total"] == 10 for r in board.records)


def test_without_a_board_everything_is_a_no_op():
    clock = FakeClock()
    reporter = ProgressReporter(None, "id000", 2, clock=clock)
    loss = CountingLoss(0.5)
    reporter.phase("loading model")
    reporter.start(0)
    clock.advance(5.0)
    assert reporter.step(1, loss) is True  # it still decides what it would send
    assert reporter.step(2, loss) is True
    assert reporter.seconds_per_step is not None


def test_loss_is_read_only_for_sent_steps():
    reporter, board, clock = _reporter(total=100, interval_s=1.0)
    loss = CountingLoss(0.125)
    reporter.start(0)
    for step in range(1, 9):
        clock.advance(0.25)
        reporter.step(step, loss)
    assert len(board.records) == 3  # start + steps 4 and 8
    assert loss.reads == 2
    assert board.records[-1]["loss"] == 0.125 and isinstance(board.records[-1]["loss"], float)


def test_board_merges_records_per_label():
    board = ProgressBoard()
    assert board.snapshot() == {}
    board.update({"label": "a", "phase": "loading model", "total": 10})
    board.update({"label": "b", "phase": "training", "step": 1})
    board.update({"label": "a", "phase": "training", "step": 4, "loss": 0.2})
    board.update({"label": "a", "phase": "exporting"})
    snap = board.snapshot()
    assert set(snap) == {"a", "b"}
    assert snap["a"] == {"label": "a", "phase": "exporting", "total": 10, "step": 4, "loss": 0.2}
    assert snap["b"] == {"label": "b", "phase": "training", "step": 1}


def test_reporter_records_feed_the_board():
    board = ProgressBoard()

    class Handle:
        class update:  # noqa: N801 (mimics an actor method)
            @staticmethod
            def remote(record):
                board.update(record)

    clock = FakeClock()
    reporter = ProgressReporter(Handle(), "id001", 4, clock=clock)
    reporter.phase("loading model")
    reporter.start(0)
    for step in range(1, 5):
        clock.advance(1.0)
        reporter.step(step, 0.5 / step)
    record = board.snapshot()["id001"]
    assert record["phase"] == "training" and record["step"] == 4 and record["start_step"] == 0
    assert record["loss"] == pytest.approx(0.125)
    assert record["eta_s"] == pytest.approx(0.0)
