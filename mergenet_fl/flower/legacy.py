"""MergeNet for an app written on Flower's legacy client API: its ``NumPyClient``, unchanged,
inside a Message-API ClientApp that speaks this project's protocol.

.. code-block:: python

    app = numpy_client_app(
        lambda context: FlowerClient(...),          # the NumPyClient, without .to_client()
        model=lambda client: client.net,            # the torch model it trains
        identity=lambda context: ClientIdentity(f"client-{context.node_config['partition-id']}"),
        layers=["fc2"],
        rank=4,
    )

The client's ``fit`` and ``evaluate`` get this node's own model as their ``parameters``
(``state_dict`` order, the convention of Flower's PyTorch examples) with the merged factors
installed, and ``fit``'s returned parameters become the node's model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from torch import nn

from mergenet_fl import LayerSpec, as_spec, select_layers
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.client import (
    evaluate_reply,
    load_local_model,
    query_reply,
    receive,
    reply,
    save_local_model,
)


def numpy_client_app(
    client_fn: Callable[[Context], NumPyClient],
    *,
    model: Callable[[NumPyClient], nn.Module],
    identity: Callable[[Context], p.ClientIdentity],
    layers: LayerSpec | Sequence[str],
    rank: int,
) -> ClientApp:
    """A ClientApp that runs ``client_fn(context)``'s ``fit`` and ``evaluate`` in MergeNet's
    protocol; ``model(client)`` is the torch module the client trains."""
    spec = layers if isinstance(layers, LayerSpec) else as_spec(layers)
    app = ClientApp()

    def config(msg: Message) -> dict:
        return dict(msg.content.config_records.get(p.CONFIG, ConfigRecord()))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return query_reply(msg, identity(context))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = client_fn(context)
        net = model(client)
        load_local_model(context, net)
        selected = select_layers(net, spec)
        installed = receive(msg, net, selected, rank=rank)
        parameters, num_examples, metrics = client.fit(weights(net), config(msg))
        set_weights(net, parameters)
        save_local_model(context, net)
        metrics = {**metrics, p.NUM_EXAMPLES: num_examples}
        return reply(msg, net, selected, identity(context), installed, metrics, rank=rank)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        client = client_fn(context)
        net = model(client)
        load_local_model(context, net)
        loss, num_examples, metrics = client.evaluate(weights(net), config(msg))
        metrics = {**metrics, "loss": loss, p.NUM_EXAMPLES: num_examples}
        return evaluate_reply(msg, identity(context), metrics)

    return app


def weights(net: nn.Module) -> list[np.ndarray]:
    """The model as a ``NumPyClient`` sees it: ``state_dict`` values, in order. Copies: a client
    may keep them as the round's reference while it trains the model (e.g. a proximal term)."""
    return [v.detach().cpu().numpy().copy() for v in net.state_dict().values()]


def set_weights(net: nn.Module, parameters: Sequence[np.ndarray]) -> None:
    """Load ``fit``'s returned parameters (``state_dict`` order); a wrong count is an error."""
    keys = list(net.state_dict())
    if len(parameters) != len(keys):
        raise ValueError(f"fit returned {len(parameters)} arrays; the model has {len(keys)}")
    net.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in zip(keys, parameters, strict=True)}
    )
