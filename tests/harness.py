"""Shared test helpers. An in-process federation for strategy tests: real messages, real
client helpers, no Ray; and the marker for tests that read the shared real data.

``FakeGrid`` delivers each message to a :class:`TinyClient` that runs the same code a
ClientApp runs (``mergenet_fl.flower.client``), so the strategy is tested against the real protocol.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from mergenet_fl import LayerSpec, select_layers
from mergenet_fl.flower import client as mc
from mergenet_fl.flower.protocol import ClientIdentity
from simulations.data import default_data_dir

RANK = 4

needs_real_data = pytest.mark.skipif(
    not (default_data_dir() / "SHA256SUMS").is_file(),
    reason=f"shared data folder not found at {default_data_dir()} (set MERGENET_DATA_DIR)",
)


def set_task_identity() -> None:
    """Messages need a run id, which the Flower runtime normally sets."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 3)
    )


ARCHS = {"mlp": (mlp, ["3"]), "cnn": (cnn, ["0"])}


class TinyClient:
    """A client with its own model, data and ``context.state``."""

    def __init__(self, client_id: str, arch: str, seed: int) -> None:
        build, targets = ARCHS[arch]
        self.build, self.seed = build, seed
        self.identity = ClientIdentity(client_id, arch)
        self.context = Context(
            run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}
        )
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 3, 2, 2, generator=gen)
        self.y = (self.x.sum(dim=(1, 2, 3)) > 0).long() + (self.x[:, 0, 0, 0] > 1).long()
        self.layers = select_layers(build(seed), LayerSpec(targets))
        self.on_train: Callable[[Message], None] | None = None  # fault injection

    def model(self) -> nn.Module:
        model = self.build(self.seed)
        mc.load_local_model(self.context, model)
        return model

    def train(self, msg: Message) -> Message:
        if self.on_train is not None:
            self.on_train(msg)
        model = self.model()
        installed = mc.receive(msg, model, self.layers, rank=RANK)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(self.x), self.y)
            loss.backward()
            opt.step()
        mc.save_local_model(self.context, model)
        metrics = {"num-examples": len(self.y), "train_loss": loss.item()}
        return mc.reply(msg, model, self.layers, self.identity, installed, metrics, rank=RANK)

    def __call__(self, msg: Message) -> Message:
        """What a ClientApp does with a message: dispatch on its type."""
        if msg.metadata.message_type == MessageType.QUERY:
            return mc.query_reply(msg, self.identity)
        if msg.metadata.message_type == MessageType.TRAIN:
            return self.train(msg)
        return self.evaluate(msg)

    def evaluate(self, msg: Message) -> Message:
        model = self.model()
        with torch.no_grad():
            acc = float((model(self.x).argmax(1) == self.y).float().mean())
        return mc.evaluate_reply(msg, self.identity, {"num-examples": len(self.y), "accuracy": acc})


class FakeGrid:
    """Delivers each message to its node's handler (a :class:`TinyClient`, or a real
    ClientApp via :func:`app_nodes`). Node ids are random 64-bit numbers, as in Flower;
    ``drop`` nodes never answer; ``lose`` nodes run the message but their reply is lost;
    ``tamper`` may rewrite replies."""

    def __init__(self, handlers: Iterable[Callable[[Message], Message]], seed: int = 0) -> None:
        rng = random.Random(seed)
        self.nodes = {rng.getrandbits(63): h for h in handlers}
        self.drop: set[int] = set()
        self.lose: set[int] = set()
        self.tamper: Callable[[int, Message], Message] | None = None
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def node_of(self, client_id: str) -> int:
        return next(n for n, c in self.nodes.items() if c.identity.client_id == client_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.drop:
                continue
            try:
                reply = self.nodes[nid](msg)
            except Exception as exc:  # what the ClientApp runtime turns into an error reply
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if nid in self.lose:
                continue
            if self.tamper is not None and not reply.has_error():
                reply = self.tamper(nid, reply)
            replies.append(reply)
        self.replies += replies
        return replies


def app_nodes(
    client_app: ClientApp, num_nodes: int, run_config: dict | None = None
) -> list[Callable[[Message], Message]]:
    """Handlers that run a real ClientApp, each node with its own context and partition id."""

    def node(pid: int) -> Callable[[Message], Message]:
        context = Context(
            run_id=1,
            node_id=pid,
            node_config={"partition-id": pid, "num-partitions": num_nodes},
            state=RecordDict(),
            run_config=dict(run_config or {}),
        )
        return lambda msg: client_app(msg, context)

    return [node(pid) for pid in range(num_nodes)]


# ------------------------------------------------ real Flower processes (deployment engine)
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Processes:
    """Processes started by a test, each in its own session; all stopped by PID at the end."""

    def __init__(self, logs: Path, env: dict[str, str], cwd: Path = ROOT) -> None:
        self.logs, self.env, self.cwd, self.procs = logs, env, cwd, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in self.logs.glob("*.log"))


# ------------------------------------------------ the Flower quickstart app of the conversion
QUICKSTART_APP = ROOT / "tests" / "apps" / "quickstart"


def load_quickstart(relative: str) -> ModuleType:
    """A module of the quickstart app by file, e.g. ``before/client_app.py`` (both versions
    import ``pytorchexample.task``)."""
    if str(QUICKSTART_APP) not in sys.path:
        sys.path.insert(0, str(QUICKSTART_APP))
    name = "quickstart_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, QUICKSTART_APP / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
