"""The README's "Add MergeNet to your Flower app" lines are exactly what converts the plain
quickstart app, and the converted app runs."""

import difflib
import re
from pathlib import Path

import pytest
from flwr.app import Context, MessageType, RecordDict

from apps import quickstart_fedavg, quickstart_mergenet
from harness import FakeGrid, app_nodes, set_task_identity
from strategies import protocol as p

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def changed_lines(before: str, after: str) -> list[str]:
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [  # changed lines, without blank ones and the module docstring
        line
        for line in diff
        if line[:1] in "+-"
        and line[1:].strip()
        and not line.startswith(("+++", "---"))
        and not line[1:].startswith('"""')
    ]


def test_readme_lists_exactly_the_lines_that_change():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Add MergeNet to your Flower app", 1)[1]
    block = re.search(r"```diff\n(.*?)```", section, re.S).group(1).splitlines()
    block = [line for line in block if line[:1] in "+-" and line[1:].strip()]  # no context
    apps = ROOT / "tests" / "apps"
    actual = changed_lines(
        (apps / "quickstart_fedavg.py").read_text(), (apps / "quickstart_mergenet.py").read_text()
    )
    assert block == actual


def run_app(module, nodes=3):
    grid = FakeGrid(app_nodes(module.app, nodes))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    module.server(grid, context)
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert not errors
    return grid


def test_plain_app_runs_with_fedavg():
    grid = run_app(quickstart_fedavg)
    trains = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == 9 and all("arrays" in r.content.array_records for r in trains)


def test_converted_app_runs_with_mergenet():
    grid = run_app(quickstart_mergenet)
    trains = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == 9
    rounds = [trains[i : i + 3] for i in (0, 3, 6)]
    assert not any(p.PIECES in r.content.array_records for r in rounds[0])
    for later in rounds[1:]:  # transfer rounds: every client answered with gradient pieces
        assert all(p.PIECES in r.content.array_records for r in later)
        assert all(set(r.content.array_records[p.PIECES]) == {"fc2/A", "fc2/B"} for r in later)
    # FedAvg of the whole model inside the group (share="all"), the transfer layer included
    shared = rounds[0][0].content.array_records[p.SHARED]
    assert set(shared) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    evals = [r for r in grid.replies if r.metadata.message_type == MessageType.EVALUATE]
    assert len(evals) == 9 and all(
        r.content.metric_records[p.METRICS]["accuracy"] > 0.5 for r in evals[-3:]
    )
