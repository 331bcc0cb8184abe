"""A legacy-API app (a ``NumPyClient``) runs MergeNet through ``numpy_client_app`` unchanged."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType
from flwr.client import NumPyClient

from harness import FakeGrid, app_nodes, load_quickstart, set_task_identity
from mergenet_fl.flower import ClientIdentity, MergeNet
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.legacy import numpy_client_app, set_weights, weights

task = load_quickstart("pytorchexample/task.py")


class FlowerClient(NumPyClient):
    """A client as Flower's legacy PyTorch examples write it."""

    def __init__(self, partition_id: int, seen: list) -> None:
        self.net = task.Net()
        self.trainloader, self.valloader = task.load_data(partition_id, 3, 16)
        self.seen = seen  # the parameters every fit was given (a client lives for one message)

    def fit(self, parameters, config):
        self.seen.append(parameters)
        set_weights(self.net, parameters)
        loss = task.train(self.net, self.trainloader, 1, float(config["lr"]), "cpu")
        return weights(self.net), len(self.trainloader.dataset), {"train_loss": loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = task.test(self.net, self.valloader, "cpu")
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def test_a_numpy_client_runs_mergenet_unchanged():
    seen: dict[int, list] = {0: [], 1: [], 2: []}

    def client_fn(context: Context) -> FlowerClient:
        pid = context.node_config["partition-id"]
        return FlowerClient(pid, seen[pid])

    app = numpy_client_app(
        client_fn,
        model=lambda client: client.net,
        identity=lambda ctx: ClientIdentity(f"client-{ctx.node_config['partition-id']}", "net"),
        layers=["fc2"],
        rank=4,
    )
    grid = FakeGrid(app_nodes(app, 3))
    strategy = MergeNet(share="all", min_available_nodes=3)
    initial = task.Net().state_dict()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=4,
        train_config=ConfigRecord({"lr": 0.1}),
    )
    assert not [r for r in grid.replies if r.has_error()]
    trains = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert all(p.PIECES in r.content.array_records for r in trains[3:])  # transfer rounds
    assert result.evaluate_metrics_clientapp[4]["accuracy"] > 0.6
    # fit got this node's own model (the group average it installed), not a fresh one
    assert len(seen[0]) == 4
    first, last = seen[0][0], seen[0][-1]
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(first, initial.values(), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, last, strict=True))


def test_fit_returning_the_wrong_number_of_arrays_is_an_error():
    with pytest.raises(ValueError, match="fit returned 1 arrays; the model has 4"):
        set_weights(task.Net(), [np.zeros(3)])
