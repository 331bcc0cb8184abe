"""The ClientApp: one client of the heterogeneous federation, keeping its own model.

The node's architecture, task and data follow from its ``partition-id`` (node config) and the
composed experiment config. A real SuperNode may also set ``client-id`` in its node config.
What a client derives from the config (data, tokenizer, model) is built once per process
(:func:`simulations.federation.build_workload`), at the identity handshake before round 1;
its weights, optimiser state and place in its data live in ``context.state`` (the process
reloads them only when another process wrote them last).
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch.utils.data import Dataset

from mergenet_fl.flower import client as mc
from mergenet_fl.flower import protocol as p
from simulations.config import ExperimentConfig, compose_cached
from simulations.federation import Workload, build_workload, client_identity
from simulations.tasks import TrainState, calibrated_batchnorm, resolve_device

TRAIN_STATE_KEY = "mergenet.train-state"
GLOBAL_METRICS = ("accuracy", "f1", "em", "chance", "loss")  # scored on every evaluated set
EXTENSION_KEY = "mergenet.extension"  # + the module's name: what a method trains beside the model


def sync(context: Context, work: Workload) -> None:
    """Bring the process's model and train state of this client to what ``context.state``
    holds: skipped when this process wrote that state itself (the token matches)."""
    record = context.state.config_records.get(TRAIN_STATE_KEY)
    token = None if record is None else record.get("token")
    if token is not None and work.synced == token:
        return
    if not mc.load_local_model(context, work.model):
        work.reset_model()
    work.train_state = TrainState() if record is None else _decode_train_state(dict(record))
    work.synced = token


def save(context: Context, work: Workload) -> None:
    """Keep the model and train state in ``context.state`` under a new token."""
    token = uuid.uuid4().hex
    mc.save_local_model(context, work.model)
    values = {**_encode_train_state(work.train_state), "token": token}
    context.state.config_records[TRAIN_STATE_KEY] = ConfigRecord(values)
    work.synced = token


def _encode_train_state(state: TrainState) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state.optimizer, buffer)
    return {"epoch": state.epoch, "batch": state.batch, "optimizer": buffer.getvalue()}


def _decode_train_state(values: dict[str, Any]) -> TrainState:
    optimizer = torch.load(io.BytesIO(values["optimizer"]), weights_only=True)
    return TrainState(int(values["epoch"]), int(values["batch"]), optimizer)


def _frozen(model: torch.nn.Module, dataset: Dataset, **_: object) -> dict[str, float]:
    """A frozen client's round: no step (what :meth:`Task.train` returns for one)."""
    return {"train_loss": 0.0, "train_steps": 0, "train_seconds": 0.0, "num_examples": len(dataset)}


@contextmanager
def _held(model: torch.nn.Module, held: bool) -> Iterator[None]:
    """While others train beside it, a ``held`` model gets no gradients and leaves exactly as
    it came (BatchNorm statistics included); otherwise it is left alone."""
    if not held:
        yield
        return
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wanted = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in wanted:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in wanted:
            param.requires_grad_(flag)
        model.load_state_dict(state)


def _values(modules: list[torch.nn.Module]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """A copy of every parameter's value: what the server installs shows as a change."""
    return {p: p.detach().clone() for m in modules for p in m.parameters()}


def scored_model(cfg: ExperimentConfig, work: Workload) -> torch.nn.Module:
    """The client's model as it is scored and embedded: with ``bn_calibration``, a copy whose
    BatchNorm statistics are re-estimated on the training set (the model stays as trained)."""
    if not cfg.bn_calibration:
        return work.model
    device = resolve_device(cfg.device)
    return calibrated_batchnorm(
        work.model, work.train_set, cfg.eval_batch_size, device, cfg.numerics()
    )


def probe_scores(cfg: ExperimentConfig, work: Workload) -> dict[str, float]:
    """The model's main score (accuracy, or F1) as it is scored (:func:`scored_model`, its own
    head) on the client's test rows, key ``""``, and on the global test where it has one,
    ``"_global"``: :data:`ExperimentConfig.probe_install`'s two readings."""
    model = scored_model(cfg, work)
    scoring = dict(
        batch_size=cfg.eval_batch_size, device=resolve_device(cfg.device), numerics=cfg.numerics()
    )
    sets = {"": work.eval_set}
    if work.data.global_set is not None:
        sets["_global"] = work.data.global_set
    out = {}
    for suffix, dataset in sets.items():
        metrics = work.task.evaluate(model, dataset, **scoring)
        out[suffix] = float(metrics["f1" if "f1" in metrics else "accuracy"])
    work.model.cpu()
    return out


def embed(cfg: ExperimentConfig, work: Workload) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(features, logits, labels)`` of the client's training set under its model in eval
    mode, as it is scored (:func:`scored_model`): a few local steps leave the running
    statistics off the weights' scale, and class means of such features or logits would pull
    every client off scale (FD diverged to non-finite logits so)."""
    return work.task.embed(
        scored_model(cfg, work),
        work.train_set,
        work.head,
        batch_size=cfg.eval_batch_size,
        device=resolve_device(cfg.device),
        numerics=cfg.numerics(),
    )


class FederationClientApp(ClientApp):
    """A ClientApp that pickles as its recipe, ``make_client_app(config_for)``.

    Flower's simulation engine sends the ClientApp to a Ray actor with every message; pickled
    as it stands, its handlers (closures) cost 2.6 ms of the driver's CPU a message, as its
    recipe 0.04 ms (with a picklable ``config_for``: :class:`FixedConfig`, :func:`config_from_run`).
    The recipe is all that travels: handlers or mods added to the app after
    :func:`make_client_app` returned it would not reach the actors.
    """

    def __init__(self, config_for: Callable[[Context], ExperimentConfig]) -> None:
        super().__init__()
        self.config_for = config_for

    def __reduce__(self) -> tuple:
        return make_client_app, (self.config_for,)


@dataclass(frozen=True)
class FixedConfig:
    """``config_for`` of a run whose config is known before it starts (a study's run)."""

    cfg: ExperimentConfig

    def __call__(self, context: Context) -> ExperimentConfig:
        return self.cfg


def config_from_run(context: Context) -> ExperimentConfig:
    """``config_for`` of ``flwr run``: the run config's Hydra ``overrides``."""
    return compose_cached(str(context.run_config.get("overrides", "")))


def make_client_app(config_for: Callable[[Context], ExperimentConfig]) -> ClientApp:
    """A ClientApp whose config comes from ``config_for(context)``."""
    app = FederationClientApp(config_for)

    def node(context: Context) -> tuple[int, str | None]:
        client_id = context.node_config.get("client-id")
        return int(context.node_config["partition-id"]), str(client_id) if client_id else None

    def workload(context: Context) -> tuple[ExperimentConfig, Workload]:
        cfg = config_for(context)
        work = build_workload(cfg, *node(context))
        sync(context, work)
        return cfg, work

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = config_for(context)
        build_workload(cfg, *node(context))  # now, so that round 1 costs only its training
        return mc.query_reply(msg, client_identity(cfg, *node(context)))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        entered, started_at = time.perf_counter(), time.time()
        cfg, work = workload(context)
        work.synced = None  # until saved: a failure below must not leave a half-trained model
        config = msg.content.config_records[p.CONFIG]
        server_round = int(config[p.ROUND])
        state_dir = config.get(p.CLIENT_STATE_DIR)
        client_id = work.identity.client_id
        if state_dir and not mc.has_local_model(context):  # a restarted run: back from disk
            saved = mc.load_model_file(str(state_dir), client_id, server_round - 1, work.model)
            if saved:
                work.train_state = _decode_train_state(saved)
        extension = cfg.build_extension(work.model, work.head, work.data.num_classes, work.layers)
        for name, module in extension.modules().items():  # kept from the node's last round
            mc.load_local_model(context, module, key=f"{EXTENSION_KEY}.{name}")
        unsent = probe_scores(cfg, work) if cfg.probe_install else {}
        start = time.perf_counter()
        modules = [work.model, *extension.modules().values()]
        before = _values(modules) if work.train_state.optimizer is not None else {}
        mc.load_group(msg, work.model)
        extension.begin(msg, work.model)
        installed = [param for param, value in before.items() if not torch.equal(param, value)]
        overhead = time.perf_counter() - start
        probed = {}
        if cfg.probe_install:  # what the install alone does to the scores, before any step
            probed = {
                f"install_gain{suffix}": after - unsent[suffix]
                for suffix, after in probe_scores(cfg, work).items()
            }
        partition_id = int(context.node_config["partition-id"])
        group = cfg.client(partition_id)[0]
        steps = group.local_steps or cfg.local_steps
        # a frozen client takes no step; its method's own models (FML's and FedKD's shared
        # model) still learn, with its model as a fixed teacher
        teacher = group.frozen and bool(extension.modules())
        train = _frozen if group.frozen and not teacher else work.task.train
        with _held(work.model, teacher):
            metrics = train(
                work.model,
                work.train_set,
                steps=steps,
                epochs=None if steps else int(config.get("local-epochs", cfg.local_epochs)),
                batch_size=cfg.batch_size,
                seed=cfg.seed * 100_003 + partition_id * 1009 + server_round,
                data_seed=cfg.seed * 100_003 + partition_id * 1009,
                state=work.train_state,
                lr=(work.lr or work.task.config.lr) * cfg.lr_factor(server_round),
                device=resolve_device(cfg.device),
                extension=extension if extension.adds_loss else None,
                head=work.head,
                numerics=cfg.numerics(),
                installed=installed,
                after_step=extension.after_step,
            )
        if cfg.optimizer_state == "fresh":  # a new optimiser every round, as HtFLlib and Flower:
            work.train_state.optimizer = None  # nothing of this one to keep or to carry
        work.model.cpu()  # factors and replies are built on the CPU
        start = time.perf_counter()
        records = extension.end(msg, work.model, lambda: embed(cfg, work))
        overhead += time.perf_counter() - start
        work.model.cpu()  # where embedding left it
        save(context, work)
        for name, module in extension.modules().items():
            mc.save_local_model(context, module.cpu(), key=f"{EXTENSION_KEY}.{name}")
        if state_dir:
            extra = _encode_train_state(work.train_state)
            mc.save_model_file(str(state_dir), client_id, server_round, work.model, extra)
        metrics = {
            p.NUM_EXAMPLES: metrics.pop("num_examples"),
            **metrics,
            **probed,
            "label_counts": list(work.data.label_counts),
            mc.MERGENET_SECONDS: overhead,
            "client_seconds": time.perf_counter() - entered,  # the whole message, but the reply
            # its span on the wall clock, against the stage's (bench_train: the workers' idle time)
            "started_at": started_at,
            "ended_at": time.time(),
            "bf16": int(cfg.numerics().precision == "bf16"),  # what precision=auto chose here
        }
        reply = mc.answer(
            msg,
            work.model,
            work.layers,
            work.identity,
            metrics,
            records=records,
            manifest=extension.manifest,
        )
        attack = group.attack
        if attack is not None:  # the robustness study's poisoning client
            limit = float(cfg.strategy.get("max_factor_norm", 1e4))
            reply = attack.apply(reply, limit, seed=cfg.seed * 100_003 + server_round)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        entered = time.perf_counter()
        cfg, work = workload(context)
        device = resolve_device(cfg.device)
        start = time.perf_counter()
        extension = cfg.build_extension(work.model, work.head, work.data.num_classes, work.layers)
        # BatchNorm re-estimated once for both test sets; the method's scoring in place
        model = extension.scored(msg, scored_model(cfg, work))
        scoring = dict(batch_size=cfg.eval_batch_size, device=device, numerics=cfg.numerics())
        metrics = work.task.evaluate(model, work.eval_set, **scoring)
        if work.data.global_set is not None:  # eval_split=local: the global test as well
            uniform = work.task.evaluate(model, work.data.global_set, **scoring)
            metrics.update({f"global_{k}": uniform[k] for k in GLOBAL_METRICS if k in uniform})
        if work.data.validation_set is not None:  # split=pooled: rows to choose settings on
            held = work.task.evaluate(model, work.data.validation_set, **scoring)
            metrics.update({f"val_{k}": held[k] for k in GLOBAL_METRICS if k in held})
            metrics["val_num_examples"] = held["num_examples"]
        work.model.cpu()
        metrics = {
            p.NUM_EXAMPLES: metrics.pop("num_examples"),
            **metrics,
            # the evaluation's compute: BatchNorm re-estimation and every test set scored
            "eval_seconds": time.perf_counter() - start,
            "client_seconds": time.perf_counter() - entered,
        }
        return mc.evaluate_reply(msg, work.identity, metrics)

    return app


app = make_client_app(config_from_run)
