"""The strategies' log lines in Flower's own log (what ``flwr run`` shows), with no set-up."""

from __future__ import annotations

import logging

from flwr.common.logger import console_handler

LOGGERS = ("mergenet_fl",)  # the library and its Flower strategies (mergenet_fl.flower)


def show_in_flower_log() -> None:
    """Route this project's INFO lines through Flower's console handler, as Flower's own lines,
    unless the application set up logging for them (a handler on them or on an ancestor, e.g.
    ``logging.basicConfig``): then its set-up decides."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if logger.hasHandlers():
            continue
        logger.addHandler(console_handler)
        logger.setLevel(logging.INFO)
