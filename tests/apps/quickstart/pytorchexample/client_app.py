"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from mergenet_fl import LayerSpec, select_layers
from mergenet_fl.flower import ClientIdentity
from mergenet_fl.flower.client import (
    evaluate_reply,
    load_local_model,
    query_reply,
    receive,
    reply,
    save_local_model,
)
from pytorchexample.task import Net, load_data
from pytorchexample.task import test as test_fn
from pytorchexample.task import train as train_fn

# Flower ClientApp
app = ClientApp()


def identity(context: Context) -> ClientIdentity:
    """Who this client is across restarts, and its architecture group."""
    return ClientIdentity(f"client-{context.node_config['partition-id']}", group="net")


@app.query()
def query(msg: Message, context: Context):
    return query_reply(msg, identity(context))


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    load_local_model(context, model)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)
    layers = select_layers(model, LayerSpec(["fc2"]))
    installed = receive(msg, model, layers, rank=4)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    batch_size = context.run_config["batch-size"]
    trainloader, _ = load_data(partition_id, num_partitions, batch_size)

    # Call the training function
    train_loss = train_fn(
        model,
        trainloader,
        context.run_config["local-epochs"],
        msg.content["config"]["lr"],
        device,
    )

    # Construct and return reply Message
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
    }
    save_local_model(context, model)
    return reply(msg, model, layers, identity(context), installed, metrics, rank=4)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    load_local_model(context, model)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    batch_size = context.run_config["batch-size"]
    _, valloader = load_data(partition_id, num_partitions, batch_size)

    # Call the evaluation function
    eval_loss, eval_acc = test_fn(model, valloader, device)

    # Construct and return reply Message
    metrics = {
        "eval_loss": eval_loss,
        "eval_acc": eval_acc,
        "num-examples": len(valloader.dataset),
    }
    return evaluate_reply(msg, identity(context), metrics)
