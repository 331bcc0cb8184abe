"""Notice clients' replies soon after they arrive, on any Flower grid.

Flower's grids pull replies at a fixed interval, 0.1 s in simulation and 3 s in deployment,
so every stage waits up to that long after its slowest client has answered. In a federation
that trains a few batches per round (the paper's time unit) that wait is a large part of a
round. :class:`PromptGrid` sends and pulls through the grid's own ``push_messages`` and
``pull_messages`` (Flower stays the transport) and pulls again after an interval that grows
with the wait: a reply waits at most ``SLACK`` of the time the stage has already taken, never
less than ``MIN_INTERVAL`` nor more than ``MAX_INTERVAL``. A long stage costs few pulls:
about 120 per tenfold of its duration, then one a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message

SLACK = 0.02
MIN_INTERVAL = 0.001  # seconds
MAX_INTERVAL = 1.0


def pull_interval(waited: float) -> float:
    """Seconds to sleep before the next pull, after ``waited`` seconds without every reply."""
    return min(max(MIN_INTERVAL, SLACK * waited), MAX_INTERVAL)


class PromptGrid:
    """A Flower grid whose :meth:`send_and_receive` pulls replies at :func:`pull_interval`
    and, once its messages are out, calls ``while_waiting``: work that needs no replies
    runs while the clients work instead of before or after.

    Everything else is the wrapped grid's (``get_node_ids``, ``push_messages``, ...).
    """

    def __init__(self, grid: Any, while_waiting: Callable[[], None] | None = None) -> None:
        self.grid = grid
        self.while_waiting = while_waiting

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push ``messages``, then pull until every one has a reply or ``timeout`` seconds
        (``None``: no limit) have passed; the replies that came, as Flower's grids return."""
        waiting = set(self.grid.push_messages(messages))
        start = time.monotonic()
        if waiting and self.while_waiting is not None:
            self.while_waiting()
        replies: list[Message] = []
        while waiting:
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {msg.metadata.reply_to_message_id for msg in pulled}
            waited = time.monotonic() - start
            if not waiting or (timeout is not None and waited >= timeout):
                break
            sleep = pull_interval(waited)
            if timeout is not None:
                sleep = min(sleep, timeout - waited)
            time.sleep(sleep)
        return replies
