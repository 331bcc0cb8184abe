"""The ClientApp: one client of the heterogeneous federation, keeping its own model.

The node's architecture, task and data follow from its ``partition-id`` (node config) and the
composed experiment config. A real SuperNode may also set ``client-id`` in its node config.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from simulations.config import ExperimentConfig, compose
from simulations.federation import Workload, build_workload, client_identity
from strategies import client as mc
from strategies import protocol as p


def make_client_app(config_for: Callable[[Context], ExperimentConfig]) -> ClientApp:
    """A ClientApp whose config comes from ``config_for(context)``."""
    app = ClientApp()

    def node(context: Context) -> tuple[int, str | None]:
        client_id = context.node_config.get("client-id")
        return int(context.node_config["partition-id"]), str(client_id) if client_id else None

    def workload(context: Context) -> tuple[ExperimentConfig, Workload]:
        cfg = config_for(context)
        work = build_workload(cfg, *node(context))
        mc.load_local_model(context, work.model)
        return cfg, work

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return mc.query_reply(msg, client_identity(config_for(context), *node(context)))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, work = workload(context)
        config = msg.content.config_records[p.CONFIG]
        server_round = int(config[p.ROUND])
        state_dir = config.get(p.CLIENT_STATE_DIR)
        if state_dir and not mc.has_local_model(context):  # a restarted run: back from disk
            mc.load_model_file(
                str(state_dir), work.identity.client_id, server_round - 1, work.model
            )
        start = time.perf_counter()
        installed = mc.receive(msg, work.model, work.layers, rank=cfg.rank)
        overhead = time.perf_counter() - start
        epochs = int(config.get("local-epochs", cfg.local_epochs))
        seed = cfg.seed * 100_003 + int(context.node_config["partition-id"]) * 1009 + server_round
        metrics = work.task.train(
            work.model, work.train_set, epochs=epochs, batch_size=cfg.batch_size, seed=seed
        )
        mc.save_local_model(context, work.model)
        if state_dir:
            mc.save_model_file(str(state_dir), work.identity.client_id, server_round, work.model)
        metrics = {
            p.NUM_EXAMPLES: metrics.pop("num_examples"),
            **metrics,
            mc.MERGENET_SECONDS: overhead,
        }
        return mc.reply(
            msg, work.model, work.layers, work.identity, installed, metrics, rank=cfg.rank
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, work = workload(context)
        metrics = work.task.evaluate(work.model, work.eval_set, batch_size=cfg.batch_size * 2)
        metrics = {p.NUM_EXAMPLES: metrics.pop("num_examples"), **metrics}
        return mc.evaluate_reply(msg, work.identity, metrics)

    return app


app = make_client_app(lambda context: compose(str(context.run_config.get("overrides", ""))))
