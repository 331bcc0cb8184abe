"""The experiment config: composed by Hydra from ``conf/``, checked into dataclasses.

Both entry points use :func:`compose`: ``python -m simulations.run`` (Hydra's command line)
and the Flower apps under ``flwr run`` (run config key ``overrides``).
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mergenet_fl import VARIANTS, AdapterConfig, HypernetConfig, SelectedLayer
from mergenet_fl.flower import (
    FD,
    FML,
    FedGH,
    FedKD,
    FedProto,
    FedTGP,
    GroupFedAvg,
    LGFedAvg,
    LocalOnly,
    MergeNet,
    PeerStrategy,
)
from mergenet_fl.flower.base import RoundSink
from mergenet_fl.flower.extension import (
    HEAD_SCORES,
    KL_REDUCTIONS,
    MEAN_SCORES,
    ClassMeans,
    ClientExtension,
    GlobalHead,
    MentorMentee,
    MergeNetClient,
    MutualLearning,
    SharedHead,
)
from mergenet_fl.flower.fedproto import MEANS
from mergenet_fl.flower.protocol import SHARE_MODES
from simulations import custom
from simulations.attacks import Attack
from simulations.models import ARCHITECTURES, ArchSpec, build_model, custom_arch
from simulations.numerics import PRECISIONS, Numerics
from simulations.tasks import TrainConfig, get_task, resolve_device

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STRATEGIES = (
    "mergenet",
    "local",
    "groupfedavg",
    "lgfedavg",
    "fedproto",
    "fd",
    "fml",
    "fedkd",
    "fedtgp",
    "fedgh",
)
SCORES = {"lgfedavg": HEAD_SCORES, "fedproto": MEAN_SCORES, "fedtgp": MEAN_SCORES}
SHARED_MODEL_SEED = 999  # the shared model's initialisation (FML, FedKD): one for all clients
PARTITIONS = ("iid", "dirichlet", "same")  # same: every client holds the whole set
EVAL_SPLITS = ("test", "local", "validation")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "cosine")
OPTIMIZER_STATES = ("fresh", "kept")
SPLITS = ("standard", "pooled")
CLIENT_OPTIMIZER_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "max_grad_norm")


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class ClientGroup:
    """``count`` clients of one architecture, task and dataset, sharing ``layers`` for transfer.

    ``arch`` and ``dataset`` are registry names, or the labels of the ``_target_`` mappings
    ``model`` and ``data`` (:mod:`simulations.custom`): clients whose ``data`` is the same
    mapping share that dataset's rows, as clients of one named dataset do.
    """

    group: str
    arch: str
    task: str
    dataset: str
    layers: tuple[str, ...]
    count: int = 1
    exclude: tuple[str, ...] = ()
    send_only: bool = False
    examples: int | None = None  # training examples per client (default: the federation's)
    model: dict[str, Any] | None = None  # the arch as a `_target_` (any model)
    head: str | None = None  # a `_target_` model's head: the nn.Linear whose input are features
    data: dict[str, Any] | None = None  # the dataset as a `_target_` (any datasets.Dataset)
    columns: dict[str, str] = field(default_factory=dict)  # `data`'s column names, if not
    # image / text / label
    partition: str | None = None  # iid: the group's clients draw uniform rows before the
    # federation's partition splits the rest (a data-rich hub among label-skewed clients)
    pretrain_epochs: int = 0  # epochs on its own rows before round 1 (cached on disk)
    frozen: bool = False  # its model never trains in a round (a pre-trained source: with
    # send_only); its method's own models (FML's, FedKD's shared model) learn from it
    local_steps: int | None = None  # batches per round for this group (default: the run's)
    attack: Attack | None = None  # poisons its train replies (the robustness study)

    @property
    def arch_spec(self) -> ArchSpec:
        """The architecture: the registry's, or the ``_target_`` model's with its ``head``."""
        if self.model is None:
            return ARCHITECTURES[self.arch]
        return custom_arch(self.model, self.task, str(self.head))


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; built by :func:`from_dictconfig`."""

    name: str
    seed: int
    num_rounds: int
    rank: int
    transfer_every: int
    local_epochs: int
    batch_size: int
    round_timeout: float
    fraction_train: float
    fraction_evaluate: float
    client_cpus: float
    client_gpus: float
    data_dir: str | None
    output_dir: str
    checkpoint: bool
    resume: str | None
    strategy: dict[str, Any]
    adapter: dict[str, Any]
    clients: tuple[ClientGroup, ...]
    examples_per_client: int
    test_examples: int
    partition: str
    alpha: float
    eval_split: str = "test"
    local_steps: int | None = None  # batches per round instead of local_epochs
    evaluate_every: int = 1
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    eval_batch_size: int = 256
    bn_calibration: bool = True
    optimizer_state: str = "fresh"
    # score the model before and after what the server installs, before training (diagnostic)
    probe_install: bool = False
    client_optimizer: dict[str, float | str | None] = field(default_factory=dict)
    augment: bool = True
    lr_milestones: tuple[int, ...] = ()  # after these rounds the clients' lr is × lr_gamma
    lr_gamma: float = 0.2
    node_wait: float = 60.0
    allow_failed_clients: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    # How a dataset's rows become the clients' (federation.split). standard: its train split
    # is partitioned among its clients, evaluation rows come from its test split
    # (eval_split, test_examples). pooled (HtFLlib, PFLlib): its train and test splits are
    # pooled and partitioned, each client's share (capped at its example count) then cut at
    # random into train, validation (validation_fraction) and test (test_fraction) rows; the
    # client evaluates on its own test rows (eval_split=validation: its validation rows),
    # test_examples does not apply and there is no global set. Classification datasets only.
    split: str = "standard"
    test_fraction: float = 0.25  # pooled: a client's share that is its test rows
    validation_fraction: float = 0.0  # pooled: a client's share held out as validation rows
    min_partition_size: int = 0  # Dirichlet: resample until every partition has this many rows

    @property
    def num_clients(self) -> int:
        return sum(c.count for c in self.clients)

    def client(self, partition_id: int) -> tuple[ClientGroup, int]:
        """The client group of ``partition_id``, and its index among :meth:`peers` of its
        dataset (its partition of that dataset)."""
        if not 0 <= partition_id < self.num_clients:
            raise ConfigError(
                f"partition-id {partition_id} is outside the federation's {self.num_clients} "
                "clients (conf/federation: the counts must add up to num-supernodes)"
            )
        expanded = [c for c in self.clients for _ in range(c.count)]
        spec = expanded[partition_id]
        return spec, sum(c.dataset == spec.dataset for c in expanded[:partition_id])

    def peers(self, dataset: str) -> list[ClientGroup]:
        """The group of every client that trains on ``dataset``, in partition order."""
        return [c for c in self.clients for _ in range(c.count) if c.dataset == dataset]

    def train_config(self, task: str) -> TrainConfig:
        """The optimiser of ``task``'s clients: its default with ``client_optimizer``'s
        non-null entries in place."""
        return _train_config(get_task(task).config, self.client_optimizer)

    def lr_factor(self, server_round: int) -> float:
        """What the clients' learning rate is multiplied by in ``server_round`` (1-based)."""
        return self.lr_gamma ** sum(server_round > m for m in self.lr_milestones)

    def numerics(self) -> Numerics:
        """How this machine's clients compute (``auto`` resolved for :attr:`device`)."""
        return Numerics.resolve(self.precision, self.channels_last, resolve_device(self.device))

    def hypernet(self) -> HypernetConfig:
        s = self.strategy
        group_targets = s.get("group_targets")
        if group_targets is None:  # a group that averages its other parameters is one target
            group_targets = s.get("share", "all") != "none"
        schedule = s.get("schedule", "constant")
        if schedule not in SCHEDULES:
            raise ConfigError(f"strategy.schedule must be one of {SCHEDULES}, got {schedule!r}")
        warmup, hold = s.get("warmup_steps", 0), s.get("hold_steps", 0)
        adapter_steps = (self.num_rounds - 1) // self.transfer_every  # one per transfer round
        return HypernetConfig(
            adapter=AdapterConfig(rank=self.rank, seed=self.seed, **self.adapter),
            optimizer=s.get("optimizer", HypernetConfig.optimizer),
            lr=s.get("lr", HypernetConfig.lr),
            weight_decay=s.get("weight_decay", HypernetConfig.weight_decay),
            warmup_steps=warmup,
            hold_steps=hold,
            decay_steps=max(adapter_steps - warmup - hold, 1) if schedule == "cosine" else None,
            max_grad_norm=s.get("max_grad_norm", HypernetConfig.max_grad_norm),
            summarize_groups=s.get("summarize_groups", HypernetConfig.summarize_groups),
            self_transfer=s.get("self_transfer", HypernetConfig.self_transfer),
            group_targets=group_targets,
            device=str(resolve_device(self.device)),
            source=s.get("source", HypernetConfig.source),
            combine=s.get("combine", HypernetConfig.combine),
            trim=float(s.get("trim", HypernetConfig.trim)),
            update_rows=s.get("update_rows", HypernetConfig.update_rows),
        )

    def build_strategy(self, on_round: RoundSink | None = None) -> PeerStrategy:
        common = dict(
            fraction_train=self.fraction_train,
            fraction_evaluate=self.fraction_evaluate,
            min_available_nodes=self.num_clients,
            evaluate_every=self.evaluate_every,
            query_timeout=self.round_timeout,
            node_wait=self.node_wait,
            seed=self.seed,
            on_round=on_round,
            average=self.strategy.get("average", "mean"),
            trim=float(self.strategy.get("trim", 0.2)),
        )
        name = self.strategy["name"]
        if name == "local":
            return LocalOnly(**common)
        if name == "groupfedavg":
            return GroupFedAvg(**common)
        if name == "lgfedavg":
            return LGFedAvg(**common)
        if name == "fedproto":
            return FedProto(mean=self.strategy.get("mean", "plain"), **common)
        if name in ("fedtgp", "fedgh"):
            server = {
                k: self.strategy[k]
                for k in ("server_epochs", "server_batch_size", "server_lr")
                if k in self.strategy
            }
            if name == "fedgh":
                return FedGH(**server, **common)
            threshold = float(self.strategy.get("margin_threshold", 100.0))
            return FedTGP(margin_threshold=threshold, **server, **common)
        if name == "fd":
            return FD(**common)
        if name == "fml":
            return FML(**common)
        if name == "fedkd":
            return FedKD(
                t_start=float(self.strategy.get("t_start", 0.95)),
                t_end=float(self.strategy.get("t_end", 0.98)),
                **common,
            )
        return MergeNet(
            hypernet=self.hypernet(),
            transfer_every=self.transfer_every,
            share=self.strategy.get("share", "all"),
            max_packet_age=self.strategy.get("max_packet_age"),
            max_packet_values=self.strategy.get("max_packet_values", 50_000_000),
            max_factor_norm=self.strategy.get("max_factor_norm", 1e4),
            clip_pieces=self.strategy.get("clip_pieces", 100.0),
            screen=self.strategy.get("screen"),
            **common,
        )

    @property
    def shared_arch(self) -> ArchSpec | None:
        """FML's shared model, FedKD's mentee: the registry's ``strategy.model``, else the
        first group's architecture (None: ``strategy.model`` is no registered name)."""
        name = self.strategy.get("model")
        return ARCHITECTURES.get(name) if name else self.clients[0].arch_spec

    def build_extension(
        self,
        model: nn.Module,
        head: str,
        num_classes: int,
        layers: Sequence[SelectedLayer] = (),
    ) -> ClientExtension:
        """The strategy's client side for a client whose ``model``'s head is module ``head``
        (``layers``: its transfer layers)."""
        name = self.strategy["name"]
        if name == "mergenet":
            return MergeNetClient(layers, self.rank, self.strategy.get("delta_steps"))
        score = self.strategy.get("score", SCORES.get(name, ("head",))[0])
        if name == "lgfedavg":
            return SharedHead(head, score)
        if name in ("fedproto", "fd", "fedtgp"):
            of = "logits" if name == "fd" else "features"
            weight = float(self.strategy.get("weight", 1.0))
            return ClassMeans(num_classes, weight, of, score, head)
        if name == "fedgh":
            return GlobalHead(num_classes, head)
        if name in ("fml", "fedkd"):
            kl = self.strategy.get("kl", "batchmean")
            arch = self.shared_arch
            assert arch is not None, "preflight refuses an unknown strategy.model"
            shared = build_model(arch, num_classes, seed=self.seed * 1000 + SHARED_MODEL_SEED)
            shared_head = arch.head
            if name == "fml":
                alpha, beta = self.strategy.get("alpha", 0.5), self.strategy.get("beta", 0.5)
                return MutualLearning(shared, shared_head, float(alpha), float(beta), kl)
            widths = (model.get_submodule(head).in_features, shared.get_submodule(shared_head))
            return MentorMentee(
                shared, shared_head, widths[0], widths[1].in_features, self.seed, kl
            )
        return ClientExtension()


def client_group(c: dict[str, Any], where: str, problems: list[str]) -> ClientGroup | None:
    """The group that entry ``c`` of ``federation.clients`` describes; what is wrong with it
    goes to ``problems`` (None: it cannot be built at all)."""
    missing = [k for k in ("group", "arch", "task", "dataset", "layers") if k not in c]
    if missing:
        problems.append(f"{where} lacks {missing}")
        return None
    layers = c["layers"]
    if not (isinstance(layers, list) and layers):
        problems.append(f"{where}.layers must be a non-empty list")
    if not (isinstance(c.get("count", 1), int) and c.get("count", 1) >= 1):
        problems.append(f"{where}.count must be >= 1")
    model = c["arch"] if custom.is_target(c["arch"]) else None
    data = c["dataset"] if custom.is_target(c["dataset"]) else None
    for key in ("arch", "dataset"):
        if isinstance(c[key], dict) and custom.TARGET not in c[key]:
            problems.append(f"{where}.{key} must be a name or a mapping with _target_")
    if model is not None and not isinstance(c.get("head"), str):
        problems.append(f"{where}.head must name the _target_ model's output nn.Linear")
    if model is None and "head" in c:
        problems.append(
            f"{where}.head applies to a _target_ arch only (a registered one has its own)"
        )
    columns = c.get("columns") or {}
    if not (
        isinstance(columns, dict)
        and set(columns) <= set(custom.COLUMNS)
        and all(isinstance(v, str) for v in columns.values())
    ):
        problems.append(
            f"{where}.columns maps {sorted(custom.COLUMNS)} to column names, got {columns!r}"
        )
        columns = {}
    if columns and data is None:
        problems.append(f"{where}.columns applies to a _target_ dataset only")
    pretrain = c.get("pretrain_epochs", 0)
    if not (isinstance(pretrain, int) and not isinstance(pretrain, bool) and pretrain >= 0):
        problems.append(f"{where}.pretrain_epochs must be an integer >= 0, got {pretrain!r}")
    if not isinstance(c.get("frozen", False), bool):
        problems.append(f"{where}.frozen must be true or false, got {c['frozen']!r}")
    steps = c.get("local_steps")
    if steps is not None and not (
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    ):
        problems.append(f"{where}.local_steps must be null or an integer >= 1, got {steps!r}")
    if c.get("partition") not in (None, "iid"):
        problems.append(f"{where}.partition must be iid or absent, got {c['partition']!r}")
    attack = None
    if c.get("attack") is not None:
        try:
            attack = Attack(**dict(c["attack"]))
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}.attack: {exc}")
    return ClientGroup(
        group=str(c["group"]),
        arch=custom.label(model) if model else str(c["arch"]),
        task=str(c["task"]),
        dataset=custom.label(data) if data else str(c["dataset"]),
        layers=tuple(layers or ()),
        count=int(c.get("count", 1)),
        exclude=tuple(c.get("exclude", ())),
        send_only=bool(c.get("send_only", False)),
        examples=c.get("examples"),
        model=model,
        head=c.get("head"),
        data=data,
        columns=dict(columns),
        partition=c.get("partition"),
        pretrain_epochs=pretrain if isinstance(pretrain, int) else 0,
        frozen=c.get("frozen") is True,
        local_steps=steps if isinstance(steps, int) and steps >= 1 else None,
        attack=attack,
    )


def _train_config(default: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """``default`` with ``given``'s non-null entries (``max_grad_norm: 0``: no clipping)."""
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    return replace(default, **given)


def compose(overrides: list[str] | str = ()) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides (a list or a shell-style string)."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return from_dictconfig(cfg)


@functools.lru_cache(maxsize=16)
def compose_cached(overrides: str) -> ExperimentConfig:
    """:func:`compose` once per process and overrides string (every client message needs it)."""
    return compose(overrides)


def from_dictconfig(cfg: DictConfig) -> ExperimentConfig:
    """Check a composed config; raise :class:`ConfigError` listing every problem."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key in ("num_rounds", "rank", "transfer_every", "local_epochs", "batch_size"):
        need(
            isinstance(raw.get(key), int) and raw[key] >= 1,
            f"{key} must be an integer >= 1, got {raw.get(key)!r}",
        )
    need(
        raw.get("local_steps") is None
        or (isinstance(raw["local_steps"], int) and raw["local_steps"] >= 1),
        f"local_steps must be null or an integer >= 1, got {raw.get('local_steps')!r}",
    )
    for key, default in (("evaluate_every", 1), ("eval_batch_size", 256)):
        value = raw.get(key, default)
        need(
            isinstance(value, int) and value >= 1,
            f"{key} must be an integer >= 1, got {raw.get(key)!r}",
        )
    for key, default, choices in (
        ("device", "auto", DEVICES),
        ("precision", "auto", PRECISIONS),
        ("optimizer_state", "fresh", OPTIMIZER_STATES),
    ):
        need(
            raw.get(key, default) in choices,
            f"{key} must be one of {choices}, got {raw.get(key)!r}",
        )
    client_optimizer = dict(raw.get("client_optimizer") or {})
    for key, value in client_optimizer.items():
        need(
            key in CLIENT_OPTIMIZER_KEYS,
            f"client_optimizer.{key} is unknown; known: {CLIENT_OPTIMIZER_KEYS}",
        )
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        need(
            value is None or (key == "optimizer") != number,
            f"client_optimizer.{key} must be {'a name' if key == 'optimizer' else 'a number'} "
            f"or null, got {value!r}",
        )
    try:
        wellformed = {
            k: v
            for k, v in client_optimizer.items()
            if k in CLIENT_OPTIMIZER_KEYS
            and (k == "optimizer") == isinstance(v, str)
            and not isinstance(v, bool)
        }
        _train_config(TrainConfig(), wellformed)
    except ValueError as exc:
        problems.append(f"client_optimizer: {exc}")
    milestones = raw.get("lr_milestones") or []
    need(
        isinstance(milestones, list)
        and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones),
        f"lr_milestones must be a list of rounds >= 1, got {milestones!r}",
    )
    gamma = raw.get("lr_gamma", 0.2)
    need(
        isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma <= 1,
        f"lr_gamma must be in (0, 1], got {gamma!r}",
    )
    for key in ("channels_last", "bn_calibration", "augment", "probe_install"):
        need(
            isinstance(raw.get(key, True), bool),
            f"{key} must be true or false, got {raw.get(key)!r}",
        )
    need(
        isinstance(raw.get("node_wait", 60), (int, float)) and raw.get("node_wait", 60) > 0,
        f"node_wait must be a number of seconds > 0, got {raw.get('node_wait')!r}",
    )
    for key in ("fraction_train", "fraction_evaluate"):
        need(
            isinstance(raw.get(key), (int, float)) and 0 <= raw[key] <= 1,
            f"{key} must be in [0, 1], got {raw.get(key)!r}",
        )
    need(
        isinstance(raw.get("client_cpus"), (int, float)) and raw["client_cpus"] > 0,
        "client_cpus must be > 0",
    )
    need(
        isinstance(raw.get("client_gpus", 0), (int, float)) and raw.get("client_gpus", 0) >= 0,
        f"client_gpus must be >= 0, got {raw.get('client_gpus')!r}",
    )
    need(
        raw.get("eval_split", "test") in EVAL_SPLITS,
        f"eval_split must be one of {EVAL_SPLITS}, got {raw.get('eval_split')!r}",
    )
    strategy = dict(raw.get("strategy") or {})
    need(
        strategy.get("name") in STRATEGIES,
        f"strategy.name must be one of {STRATEGIES}, got {strategy.get('name')!r}",
    )
    need(
        strategy.get("share", "none") in SHARE_MODES, f"strategy.share must be one of {SHARE_MODES}"
    )
    need(
        strategy.get("group_targets") in (None, True, False),
        "strategy.group_targets must be true, false or null, got "
        f"{strategy.get('group_targets')!r}",
    )
    choices = SCORES.get(strategy.get("name"), ("head",))
    need(
        strategy.get("score", choices[0]) in choices,
        f"strategy.score must be one of {choices} for {strategy.get('name')}, "
        f"got {strategy.get('score')!r}",
    )
    need(
        strategy.get("kl", "batchmean") in KL_REDUCTIONS,
        f"strategy.kl must be one of {KL_REDUCTIONS}, got {strategy.get('kl')!r}",
    )
    need(
        strategy.get("mean", "plain") in MEANS,
        f"strategy.mean must be one of {MEANS}, got {strategy.get('mean')!r}",
    )
    delta_steps = strategy.get("delta_steps")
    need(
        delta_steps is None
        or (
            isinstance(delta_steps, int) and not isinstance(delta_steps, bool) and delta_steps >= 1
        ),
        f"strategy.delta_steps must be null or an integer >= 1, got {delta_steps!r}",
    )
    weight = strategy.get("weight", 1.0)
    need(
        isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
        f"strategy.weight must be a number >= 0, got {weight!r}",
    )
    adapter = dict(raw.get("adapter") or {})
    need(
        adapter.get("variant") in VARIANTS,
        f"adapter.variant must be one of {VARIANTS}, got {adapter.get('variant')!r}",
    )
    fed = dict(raw.get("federation") or {})
    need(fed.get("partition") in PARTITIONS, f"federation.partition must be one of {PARTITIONS}")
    need(
        isinstance(fed.get("alpha"), (int, float)) and fed["alpha"] > 0,
        "federation.alpha must be > 0",
    )
    need(
        isinstance(fed.get("examples_per_client"), int) and fed["examples_per_client"] >= 1,
        "federation.examples_per_client must be an integer >= 1",
    )
    split = fed.get("split", "standard")
    test_fraction = fed.get("test_fraction", 0.25)
    validation_fraction = fed.get("validation_fraction", 0.0)
    min_partition_size = fed.get("min_partition_size", 0)
    need(split in SPLITS, f"federation.split must be one of {SPLITS}, got {split!r}")

    def is_number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    test_ok = is_number(test_fraction) and 0 < test_fraction < 1
    validation_ok = is_number(validation_fraction) and 0 <= validation_fraction < 1
    need(test_ok, f"federation.test_fraction must be in (0, 1), got {test_fraction!r}")
    need(
        validation_ok,
        f"federation.validation_fraction must be in [0, 1), got {validation_fraction!r}",
    )
    need(
        not (test_ok and validation_ok) or test_fraction + validation_fraction < 1,
        "federation.test_fraction + federation.validation_fraction must be < 1, got "
        f"{test_fraction!r} + {validation_fraction!r}",
    )
    need(
        isinstance(min_partition_size, int)
        and not isinstance(min_partition_size, bool)
        and min_partition_size >= 0,
        f"federation.min_partition_size must be an integer >= 0, got {min_partition_size!r}",
    )
    need(
        split != "pooled"
        or raw.get("eval_split", "test") != "validation"
        or not validation_ok
        or validation_fraction > 0,
        "eval_split=validation with federation.split=pooled needs "
        f"federation.validation_fraction > 0, got {validation_fraction!r}",
    )
    clients = []
    for i, c in enumerate(fed.get("clients") or []):
        group = client_group(c, f"federation.clients[{i}]", problems)
        if group is not None:
            clients.append(group)
    need(bool(clients), "federation.clients is empty")
    try:
        AdapterConfig(rank=raw.get("rank", 8), **adapter)
    except (TypeError, ValueError) as exc:
        problems.append(f"adapter: {exc}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return ExperimentConfig(
        name=str(raw["name"]),
        seed=int(raw["seed"]),
        num_rounds=raw["num_rounds"],
        rank=raw["rank"],
        transfer_every=raw["transfer_every"],
        local_epochs=raw["local_epochs"],
        batch_size=raw["batch_size"],
        round_timeout=float(raw["round_timeout"]),
        fraction_train=float(raw["fraction_train"]),
        fraction_evaluate=float(raw["fraction_evaluate"]),
        client_cpus=float(raw["client_cpus"]),
        client_gpus=float(raw.get("client_gpus", 0)),
        data_dir=raw.get("data_dir"),
        output_dir=str(raw["output_dir"]),
        checkpoint=bool(raw.get("checkpoint", False)),
        resume=raw.get("resume"),
        strategy=strategy,
        adapter=adapter,
        clients=tuple(clients),
        examples_per_client=fed["examples_per_client"],
        test_examples=int(fed.get("test_examples", 256)),
        partition=fed["partition"],
        alpha=float(fed["alpha"]),
        eval_split=str(raw.get("eval_split", "test")),
        local_steps=raw.get("local_steps"),
        evaluate_every=int(raw.get("evaluate_every", 1)),
        device=str(raw.get("device", "auto")),
        precision=str(raw.get("precision", "auto")),
        channels_last=bool(raw.get("channels_last", True)),
        eval_batch_size=int(raw.get("eval_batch_size", 256)),
        bn_calibration=bool(raw.get("bn_calibration", True)),
        optimizer_state=str(raw.get("optimizer_state", "fresh")),
        probe_install=bool(raw.get("probe_install", False)),
        client_optimizer=client_optimizer,
        augment=bool(raw.get("augment", True)),
        lr_milestones=tuple(milestones),
        lr_gamma=float(gamma),
        node_wait=float(raw.get("node_wait", 60)),
        allow_failed_clients=bool(raw.get("allow_failed_clients", False)),
        raw=raw,
        split=str(split),
        test_fraction=float(test_fraction),
        validation_fraction=float(validation_fraction),
        min_partition_size=int(min_partition_size),
    )


def federation_config(cfg: ExperimentConfig) -> str:
    """``flwr run --federation-config`` for a local simulation of ``cfg``: one SuperNode per
    client, with the config's resources."""
    return (
        f"num-supernodes={cfg.num_clients} client-resources-num-cpus={cfg.client_cpus:g} "
        f"client-resources-num-gpus={cfg.client_gpus:g}"
    )


if __name__ == "__main__":  # check the composed config, print its --federation-config
    import sys

    from simulations.preflight import preflight

    try:
        exp = compose(sys.argv[1:])
        preflight(exp)
    except ConfigError as exc:
        sys.exit(str(exc))
    print(federation_config(exp))
