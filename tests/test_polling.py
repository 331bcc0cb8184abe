"""PromptGrid: replies are noticed soon after they arrive, with few pulls, within the timeout."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from harness import FakeGrid, TinyClient, set_task_identity
from mergenet_fl.flower import polling
from mergenet_fl.flower.baselines import LocalOnly
from mergenet_fl.flower.polling import PromptGrid, pull_interval


class Clock:
    """Virtual time for ``time.monotonic`` and ``time.sleep`` in
    :mod:`mergenet_fl.flower.polling`."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


class DelayedGrid:
    """A grid whose node ``i`` answers ``delays[i]`` virtual seconds after the push (``None``:
    never); it counts pulls and notes when each reply was available and when it was pulled."""

    def __init__(self, clock: Clock, delays: list[float | None]) -> None:
        self.clock, self.delays = clock, delays
        self.pending: dict[str, tuple[float, Message]] = {}
        self.pulls = 0
        self.late: list[float] = []  # seconds between a reply's arrival and its pull

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg_id = f"m{i}"
            msg.metadata.__dict__["_message_id"] = msg_id  # as Flower's grids set it
            if self.delays[i] is not None:
                reply = Message(RecordDict({"c": ConfigRecord({"i": i})}), reply_to=msg)
                self.pending[msg_id] = (self.clock.now + self.delays[i], reply)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for msg_id in list(message_ids):
            if msg_id in self.pending and self.pending[msg_id][0] <= self.clock.now:
                at, reply = self.pending.pop(msg_id)
                self.late.append(self.clock.now - at)
                out.append(reply)
        return out


@pytest.fixture
def clock(monkeypatch) -> Clock:
    set_task_identity()
    c = Clock()
    monkeypatch.setattr(polling.time, "monotonic", c.monotonic)
    monkeypatch.setattr(polling.time, "sleep", c.sleep)
    return c


def messages(n: int) -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN) for i in range(n)
    ]


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 3.0, 600.0])
def test_a_reply_is_noticed_within_the_slack_of_its_wait(clock, delay):
    grid = DelayedGrid(clock, [delay, delay / 2])
    replies = PromptGrid(grid).send_and_receive(messages(2), timeout=3600)
    assert len(replies) == 2
    # Flower's grids would be late by up to 0.1 s (simulation) or 3 s (deployment)
    assert max(grid.late) <= max(polling.MIN_INTERVAL, min(polling.SLACK * delay, 1.0)) + 1e-9
    # about 120 pulls per tenfold of the wait, then one per MAX_INTERVAL
    assert grid.pulls <= 450 + delay / polling.MAX_INTERVAL


def test_send_and_receive_stops_at_the_timeout_with_the_replies_that_came(clock):
    grid = DelayedGrid(clock, [0.2, None, 50.0])
    replies = PromptGrid(grid).send_and_receive(messages(3), timeout=10.0)
    assert [int(r.content.config_records["c"]["i"]) for r in replies] == [0]
    assert clock.now == pytest.approx(10.0)


def test_work_that_needs_no_replies_runs_once_the_messages_are_out(clock):
    grid = DelayedGrid(clock, [0.3, 0.1])
    seen = []
    prompt = PromptGrid(grid, lambda: seen.append((len(grid.pending), grid.pulls)))
    assert len(prompt.send_and_receive(messages(2), timeout=10)) == 2
    assert seen == [(2, 0)]  # once, after the push, before any pull
    prompt.send_and_receive([], timeout=10)  # nothing sent: nothing to wait for
    assert len(seen) == 1


def test_the_pull_interval_grows_with_the_wait_within_its_bounds():
    assert pull_interval(0.0) == polling.MIN_INTERVAL
    assert pull_interval(2.0) == pytest.approx(polling.SLACK * 2.0)
    assert pull_interval(1e6) == polling.MAX_INTERVAL


def test_the_strategy_polls_promptly_on_flower_grids_only():
    """Flower's grids are wrapped; anything else that speaks send_and_receive is used as is."""
    seen = []

    class Seen(Exception):
        pass

    class Recording(LocalOnly):
        def configure_train(self, server_round, arrays, config, grid):
            seen.append(grid)
            raise Seen

    class FlowerGrid(FakeGrid, Grid):  # a Flower Grid; the abstract methods are not called
        set_run = run = create_message = push_messages = pull_messages = None

    set_task_identity()
    for grid in (FakeGrid([TinyClient("a", "mlp", 0)]), FlowerGrid([TinyClient("a", "mlp", 0)])):
        with pytest.raises(Seen):
            Recording().start(grid, ArrayRecord(), num_rounds=1)
    assert not isinstance(seen[0], PromptGrid)
    assert isinstance(seen[1], PromptGrid) and isinstance(seen[1].grid, FlowerGrid)
