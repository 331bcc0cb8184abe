"""The quickstart app converted to MergeNet with the README's lines (the 'after')."""

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import nn

from mergenet_fl import LayerSpec, select_layers
from strategies import ClientIdentity, MergeNet
from strategies.client import (
    evaluate_reply,
    load_local_model,
    query_reply,
    receive,
    reply,
    save_local_model,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(partition_id)
    x = torch.randn(64, 8, generator=gen)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def test_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


app = ClientApp()


def identity(context: Context) -> ClientIdentity:
    return ClientIdentity(f"client-{context.node_config['partition-id']}", group="net")


@app.query()
def query(msg: Message, context: Context) -> Message:
    return query_reply(msg, identity(context))


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    load_local_model(context, model)
    layers = select_layers(model, LayerSpec(["fc2"]))
    installed = receive(msg, model, layers, rank=2)
    x, y = load_data(context.node_config["partition-id"])
    loss = train_fn(model, x, y)
    metrics = {"train_loss": loss, "num-examples": len(y)}
    save_local_model(context, model)
    return reply(msg, model, layers, identity(context), installed, metrics, rank=2)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    load_local_model(context, model)
    x, y = load_data(context.node_config["partition-id"])
    metrics = {"accuracy": test_fn(model, x, y), "num-examples": len(y)}
    return evaluate_reply(msg, identity(context), metrics)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = MergeNet(share="all", min_available_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=3)
