"""The README's "Add MergeNet to your Flower app" converts an app in the layout Flower ships
(``pyproject.toml``, ``client_app.py``, ``server_app.py``, ``task.py``) with exactly its lines,
and the converted app runs: in process on a fake grid, and with ``flwr run`` on Flower's
deployment engine (a SuperLink and two SuperNodes), its MergeNet lines in the run's log."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from harness import (
    BIN,
    QUICKSTART_APP,
    FakeGrid,
    Processes,
    app_nodes,
    free_port,
    load_quickstart,
    set_task_identity,
    wait_for_port,
)
from mergenet_fl.flower import protocol as p

ROOT = Path(__file__).resolve().parent.parent
APP = QUICKSTART_APP  # the converted app; before/ holds the original
FILES = {  # the README's name -> (original, converted)
    "pyproject.toml": ("before/pyproject.toml", "pyproject.toml"),
    "pytorchexample/client_app.py": ("before/client_app.py", "pytorchexample/client_app.py"),
    "pytorchexample/server_app.py": ("before/server_app.py", "pytorchexample/server_app.py"),
}
RUN_CONFIG = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def changed_lines(before: str, after: str) -> list[str]:
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [  # changed lines, without blank ones
        line
        for line in diff
        if line[:1] in "+-" and line[1:].strip() and not line.startswith(("+++", "---"))
    ]


def readme_blocks() -> dict[str, list[str]]:
    """File name -> the changed lines of its diff block in the README's section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Add MergeNet to your Flower app", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^`([^`]+)`:\n\n```diff\n(.*?)```", section, re.M | re.S)
    return {
        name: [line for line in body.splitlines() if line[:1] in "+-" and line[1:].strip()]
        for name, body in blocks
    }


def test_readme_lists_exactly_the_lines_that_change():
    blocks = readme_blocks()
    assert set(blocks) == set(FILES)
    for name, (before, after) in FILES.items():
        actual = changed_lines((APP / before).read_text(), (APP / after).read_text())
        assert blocks[name] == actual, name


def run_in_process(client: str, server: str, nodes: int = 3) -> FakeGrid:
    grid = FakeGrid(app_nodes(load_quickstart(client).app, nodes, RUN_CONFIG))
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=RUN_CONFIG
    )
    load_quickstart(server).app(grid, context)
    assert not [r.error.reason for r in grid.replies if r.has_error()]
    return grid


def test_the_original_app_runs_with_fedavg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = run_in_process("before/client_app.py", "before/server_app.py")
    trains = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == 9 and all("arrays" in r.content.array_records for r in trains)
    assert (tmp_path / "final_model.pt").exists()


def test_the_converted_app_runs_with_mergenet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = run_in_process("pytorchexample/client_app.py", "pytorchexample/server_app.py")
    trains = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    rounds = [trains[i : i + 3] for i in (0, 3, 6)]
    assert not any(p.PIECES in r.content.array_records for r in rounds[0])
    for later in rounds[1:]:  # transfer rounds: every client answered with gradient pieces
        assert all(set(r.content.array_records[p.PIECES]) == {"fc2/A", "fc2/B"} for r in later)
    # every client started from the server's initial model, then FedAvg inside the group
    assert all(r.content.metric_records[p.METRICS][p.INITIAL_LOADED] == 1.0 for r in rounds[0])
    net = load_quickstart("pytorchexample/task.py").Net()
    net.load_state_dict(torch.load(tmp_path / "final_model_net.pt"))  # the group's model
    assert (tmp_path / "mergenet-run" / "summary.md").exists()


@pytest.mark.slow
@pytest.mark.deployment
def test_flwr_run_of_the_converted_app_shows_mergenet_in_its_log(tmp_path):
    home, logs = tmp_path / "flwr", tmp_path / "logs"
    for folder in (home, logs):
        folder.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # this environment has mergenet-fl
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink.edge]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    procs = Processes(logs, env, cwd=tmp_path)  # the ServerApp writes its files here
    try:
        link = procs.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
        wait_for_port(port, link)
        for pid in range(2):
            procs.start(
                f"supernode{pid}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={pid} num-partitions=2",
            )
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "edge", "--stream"]
            + ["--run-config", "num-server-rounds=2"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-3000:] + procs.tail()
        # the strategy's own INFO lines, in Flower's log, with no logging set-up in the app
        assert "merged factors for 2 of 2 sampled clients" in log, log[-3000:] + procs.tail()
        assert "adapter step from 2 clients" in log
        assert "group 'net' starts from the initial arrays" in log
    finally:
        procs.stop()
    assert all(proc.poll() is not None for proc in procs.procs)
