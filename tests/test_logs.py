"""A plain Flower app shows the strategy's INFO lines in Flower's log, with no set-up; an app
that set up logging keeps its own."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import logging, sys
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.INFO, format="MINE %(name)s: %(message)s")
from mergenet_fl.flower import MergeNet
MergeNet()
logging.getLogger("mergenet_fl.flower.mergenet").info("round 2: adapter step")
logging.getLogger("mergenet_fl.hypernet").warning("adapter step skipped")
"""


def output(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "configured"])
def test_strategy_lines_appear_once_in_the_log(mode):
    text = output(mode)
    assert text.count("round 2: adapter step") == 1
    assert text.count("adapter step skipped") == 1
    if mode == "plain":  # Flower's own format: "INFO :      <message>"
        assert "INFO" in text.split("round 2: adapter step")[0].splitlines()[-1]
    else:
        assert "MINE mergenet_fl.flower.mergenet: round 2: adapter step" in text
