"""The field's heterogeneous-FL baselines on the shared client protocol: LG-FedAvg (an averaged
head), FedProto (class prototypes), FD (class mean logits), FML (a shared model, mutual
learning) and FedKD (a shared mentee, SVD-compressed), server and client sides."""

from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from harness import FakeGrid, app_nodes, set_task_identity
from mergenet_fl import PacketError
from mergenet_fl.flower import client as mc
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply
from mergenet_fl.flower.extension import (
    ClassMeans,
    MentorMentee,
    MergeNetClient,
    MutualLearning,
    SharedHead,
)
from mergenet_fl.flower.fedproto import FD, FedProto
from mergenet_fl.flower.lgfedavg import LGFedAvg
from mergenet_fl.flower.shared_model import FML, FedKD
from simulations.client_app import make_client_app
from simulations.config import ConfigError, compose
from simulations.federation import build_workload
from simulations.preflight import problems


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def reply(client: str, group: str, n: float, **records: dict) -> ClientReply:
    content = RecordDict({key: p.to_record(value) for key, value in records.items()})
    return ClientReply(0, p.ClientIdentity(client, group), "", {p.NUM_EXAMPLES: n}, content, 0)


def head(value: float, classes: int = 3, width: int = 4) -> dict:
    return {
        "weight": np.full((classes, width), value, np.float32),
        "bias": np.full(classes, value, np.float32),
    }


def test_lgfedavg_averages_one_head_over_every_architecture_by_examples():
    strategy = LGFedAvg()
    replies = [reply("a", "cnn", 30, head=head(1.0)), reply("b", "resnet", 10, head=head(5.0))]
    for r in replies:
        strategy.validate(2, r)
    strategy.absorb(2, replies)
    assert np.allclose(strategy.head["weight"], 2.0) and np.allclose(strategy.head["bias"], 2.0)
    sent = strategy.train_records(3, {7: p.ClientIdentity("a", "cnn")})
    assert np.allclose(p.from_record(sent[7][p.HEAD])["weight"], 2.0)
    with pytest.raises(PacketError, match=r"head of shape \(3, 8\), the federation's is \(3, 4\)"):
        strategy.validate(3, reply("c", "bert", 10, head=head(1.0, width=8)))


def test_lgfedavg_refuses_a_federation_of_different_heads():
    strategy = LGFedAvg()
    replies = [reply("a", "cnn", 1, head=head(1.0)), reply("b", "bert", 1, head=head(1.0, width=8))]
    for r in replies:
        strategy.validate(1, r)
    with pytest.raises(ValueError, match="LG-FedAvg needs one head shape for all clients"):
        strategy.absorb(1, replies)


def protos(rows: list[list[float]], counts: list[float]) -> dict:
    return {
        "means": np.array(rows, np.float32),
        "counts": np.array(counts, np.float32),
    }


def test_fedproto_averages_each_class_by_its_counts():
    strategy = FedProto(mean="weighted")
    replies = [
        reply("a", "cnn", 4, protos=protos([[1.0, 1.0], [0.0, 0.0]], [3, 0])),  # has no class 1
        reply("b", "resnet", 4, protos=protos([[5.0, 5.0], [2.0, 4.0]], [1, 2])),
    ]
    for r in replies:
        strategy.validate(1, r)
    strategy.absorb(1, replies)
    assert np.allclose(strategy.means, [[2.0, 2.0], [2.0, 4.0]])  # a's empty class: no weight
    assert np.allclose(strategy.counts, [4, 2])
    with pytest.raises(PacketError, match=r"needs one feature width \(the head.s input\)"):
        strategy.validate(2, reply("c", "bert", 1, protos=protos([[1.0, 2.0, 3.0]] * 2, [1, 1])))
    bad = protos([[np.nan, 1.0], [0.0, 0.0]], [1, 1])
    with pytest.raises(PacketError, match="non-finite"):
        strategy.validate(2, reply("d", "cnn", 1, protos=bad))


class Tiny(nn.Module):
    def __init__(self, head_name: str = "fc") -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.add_module(head_name, nn.Linear(4, 2))


def message(config: dict | None = None, **records: dict) -> Message:
    content = RecordDict({p.CONFIG: ConfigRecord(config or {})})
    for key, value in records.items():
        content[key] = p.to_record(value)
    return Message(content, dst_node_id=1, message_type="train")


def test_shared_head_travels_between_differently_named_heads():
    cnn, bert = Tiny("fc"), Tiny("classifier")
    sent = SharedHead("fc").end(message(), cnn, lambda: [])
    arrays = p.from_record(sent[p.HEAD])
    assert set(arrays) == {"weight", "bias"}
    SharedHead("classifier").begin(message(head=arrays), bert)
    assert torch.equal(bert.classifier.weight, cnn.fc.weight)
    assert not torch.equal(bert.body.weight, cnn.body.weight)  # the extractor stays local
    wide = {"weight": np.zeros((2, 8), np.float32), "bias": np.zeros(2, np.float32)}
    with pytest.raises(PacketError, match="needs one head shape"):
        SharedHead("fc").begin(message(head=wide), cnn)


def test_prototypes_pull_features_to_their_class_and_are_class_means():
    ext = ClassMeans(num_classes=3, weight=2.0, of="features")
    ext.begin(message(protos=protos([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [5, 0, 5])), Tiny())
    features = torch.zeros(3, 2, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    loss = ext.loss(features, torch.zeros(3, 3), labels, None)
    loss.backward()
    # class 1 has no global prototype: no pull; classes 0 and 2 pulled towards theirs
    assert torch.equal(features.grad[1], torch.zeros(2))
    assert features.grad[0, 0] < 0 and features.grad[2, 1] < 0
    assert loss.item() == pytest.approx(2.0 * 2 / 4)  # 2 · mean((f − proto)²) over 2 × 2 values

    def embed():  # (features, logits, labels): the logits are never read for prototypes
        yield torch.tensor([[1.0, 1.0], [3.0, 1.0]]), torch.full((2, 3), 9.0), torch.tensor([0, 0])
        yield torch.tensor([[0.0, 4.0]]), torch.full((1, 3), 9.0), torch.tensor([2])

    out = p.from_record(ext.end(message(), Tiny(), embed)[p.PROTOS])
    assert np.allclose(out["means"], [[2.0, 1.0], [0.0, 0.0], [0.0, 4.0]])
    assert np.allclose(out["counts"], [2, 0, 1])
    assert (
        ClassMeans(3).loss(features, torch.zeros(3, 3), labels, None) is None
    )  # no prototypes yet


def test_fd_pulls_logits_not_features_and_sends_mean_logits():
    ext = ClassMeans(num_classes=2, weight=1.0, of="logits")
    ext.begin(message(logits=protos([[2.0, 0.0], [0.0, 2.0]], [3, 3])), Tiny())
    features = torch.zeros(2, 5, requires_grad=True)  # any width: FD does not read them
    logits = torch.zeros(2, 2, requires_grad=True)
    ext.loss(features, logits, torch.tensor([0, 1]), None).backward()
    assert features.grad is None and logits.grad[0, 0] < 0 and logits.grad[1, 1] < 0

    def embed():
        yield torch.zeros(2, 5), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1])

    out = p.from_record(ext.end(message(), Tiny(), embed)[p.LOGITS])
    assert np.allclose(out["means"], [[1.0, 0.0], [0.0, 3.0]])


def run_by_name(strategy: str, rounds: int = 2) -> tuple[FakeGrid, dict]:
    """The real ClientApp on ``tiny_htfe`` (two architectures, one head shape), in process."""
    cfg = compose(
        f"federation=tiny_htfe strategy={strategy} num_rounds={rounds} "
        "federation.examples_per_client=64 federation.test_examples=64"
    )
    assert problems(cfg) == []
    grid = FakeGrid(app_nodes(make_client_app(lambda context: cfg), cfg.num_clients))
    records = []
    strat = cfg.build_strategy(on_round=records.append)
    result = strat.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=60)
    assert not [r.error.reason for r in grid.replies if r.has_error()]
    assert all(not r["dropped"] for r in records)
    return grid, {"strategy": strat, "result": result}


def train_messages(grid: FakeGrid, key: str) -> list[bool]:
    return [key in m.content.array_records for m in grid.sent if m.metadata.message_type == "train"]


@pytest.mark.slow
def test_lgfedavg_runs_by_name_and_every_client_starts_a_round_with_the_global_head():
    grid, out = run_by_name("lgfedavg")
    assert train_messages(grid, p.HEAD) == [False, False, True, True]
    sent = [
        p.from_record(m.content.array_records[p.HEAD])["weight"]
        for m in grid.sent
        if m.metadata.message_type == "train" and p.HEAD in m.content.array_records
    ]
    assert sent[0].shape == (4, 512) and np.array_equal(sent[0], sent[1])
    assert out["strategy"].head["weight"].shape == (4, 512)


@pytest.mark.slow
def test_fedproto_runs_by_name_and_shares_prototypes_of_each_class():
    grid, out = run_by_name("fedproto")
    assert train_messages(grid, p.PROTOS) == [False, False, True, True]
    strategy = out["strategy"]
    assert strategy.means.shape == (4, 512) and (strategy.counts > 0).all()
    assert strategy.counts.sum() == 2 * 64  # every training example of both clients


def test_methods_that_share_the_head_refuse_federations_they_do_not_apply_to():
    found = problems(compose("federation=tiny strategy=lgfedavg"))
    assert any(
        "every client needs the same head shape (classes, features)" in f
        and "resnet8-images (4, 64)" in f
        for f in found
    )
    found = problems(compose("federation=crosstask strategy=fedproto"))
    assert any("'distilbert-squad2' is extractive QA, which has no class head" in f for f in found)

    # FD exchanges logits: models with different feature widths take part (the 4-layer CNN:
    # 512, ResNet-8: 64), as long as the class counts match
    assert not [f for f in problems(compose("federation=paper strategy=fd")) if "strategy" in f]
    found = problems(compose("federation=paper strategy=fedproto"))
    assert any("cnn4-cifar10 (10, 512), resnet8-cifar10 (10, 64)" in f for f in found)
    found = problems(compose("federation=tiny strategy=fd"))  # 4 image classes, 2 text classes
    assert any("every client needs the same class count" in f for f in found)


@pytest.mark.slow
def test_fd_runs_by_name():
    grid, out = run_by_name("fd")
    assert train_messages(grid, p.LOGITS) == [False, False, True, True]
    assert out["strategy"].means.shape == (4, 4)
    assert isinstance(out["strategy"], FD)


def shared_state(value: float, width: int = 4) -> dict:
    return {"w": np.full((3, width), value, np.float32), "b": np.full(3, value, np.float32)}


def test_fml_averages_the_shared_model_by_examples_and_drops_another_architecture():
    strategy = FML()
    replies = [
        reply("a", "cnn", 30, **{p.SHARED_MODEL: shared_state(1.0)}),
        reply("b", "resnet", 10, **{p.SHARED_MODEL: shared_state(5.0)}),
    ]
    for r in replies:
        strategy.validate(1, r)
    strategy.absorb(1, replies)
    assert np.allclose(strategy.shared["w"], 2.0) and np.allclose(strategy.shared["b"], 2.0)
    sent = p.from_record(
        strategy.train_records(2, {7: p.ClientIdentity("a", "cnn")})[7][p.SHARED_MODEL]
    )
    assert np.allclose(sent["w"], 2.0)
    with pytest.raises(PacketError, match="other entries or shapes than the federation's"):
        strategy.validate(2, reply("c", "bert", 1, **{p.SHARED_MODEL: shared_state(1.0, 8)}))
    first = FML()
    odd = [replies[0], reply("c", "bert", 1, **{p.SHARED_MODEL: shared_state(1.0, 8)})]
    for r in odd:
        first.validate(1, r)
    with pytest.raises(ValueError, match="FML needs one shared architecture"):
        first.absorb(1, odd)


def test_compression_keeps_the_energy_share_and_recovers_the_truncated_matrix():
    gen = np.random.default_rng(0)
    low = gen.normal(size=(40, 3)) @ gen.normal(size=(3, 60))  # rank 3
    state = {
        "low": (low + 1e-3 * gen.normal(size=low.shape)).astype(np.float32),
        "conv": gen.normal(size=(8, 2, 3, 3)).astype(np.float32),  # full rank: sent as it is
        "bias": np.ones(5, np.float32),
    }
    packed = p.compress_state(state, energy=0.99)
    assert packed["low@a"].shape == (40, 3) and packed["low@b"].shape == (3, 60)
    assert np.array_equal(packed["conv"], state["conv"]) and "bias" in packed
    back = p.recover_state(packed)
    assert np.abs(back["low"] - low).max() < 0.05 and back["conv"].shape == (8, 2, 3, 3)
    assert sum(v.size for v in packed.values()) < sum(v.size for v in state.values()) / 4
    with pytest.raises(PacketError, match="factors without their pair"):
        p.recover_state({"x@b": np.ones((2, 2), np.float32)})
    with pytest.raises(PacketError, match="mismatched shapes"):
        p.recover_state({"x@a": np.ones((4, 2), np.float32), "x@b": np.ones((3, 5), np.float32)})


def test_fedkd_averages_uniformly_and_sends_factors_with_a_rising_energy():
    strategy = FedKD(t_start=0.5, t_end=0.9)
    strategy.last_round = 5
    gen = np.random.default_rng(1)

    def mentee(scale: float) -> dict:
        return p.compress_state({"w": scale * gen.normal(size=(30, 20)).astype(np.float32)}, 1.0)

    replies = [
        reply("a", "cnn", 1000, **{p.SHARED_MODEL: mentee(1.0)}),
        reply("b", "r", 1, **{p.SHARED_MODEL: mentee(1.0)}),
    ]
    for r in replies:
        strategy.validate(1, r)
    strategy.absorb(1, replies)
    mean = (replies[0].extras["shared"]["w"] + replies[1].extras["shared"]["w"]) / 2
    assert np.allclose(strategy.shared["w"], mean, atol=1e-5)  # uniform, not by examples
    assert strategy.energy(1) == 0.5 and strategy.train_config(5)[p.ENERGY] == pytest.approx(0.82)
    ranks = [
        p.from_record(
            strategy.train_records(t, {7: p.ClientIdentity("a", "cnn")})[7][p.SHARED_MODEL]
        )["w@a"].shape[1]
        for t in (1, 5)
    ]
    assert ranks[0] < ranks[1] < 20


class Pair(nn.Module):
    """A model whose head ``fc`` reads 3 features."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(2, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(x)))


def batch_forward(x: torch.Tensor):
    from simulations.tasks import HEAD_INPUT, head_inputs

    def forward(other: nn.Module, head: str):
        with head_inputs(other, head):
            logits = other(x)
            return getattr(other, HEAD_INPUT), logits

    return forward


def test_mutual_learning_trains_the_shared_model_from_labels_and_the_other_model():
    x, labels = torch.randn(8, 2), torch.randint(0, 2, (8,))
    own, shared = Pair(0), Pair(1)
    ext = MutualLearning(shared, "fc", alpha=0.5, beta=0.5)
    logits = own(x)
    loss = ext.loss(None, logits, labels, batch_forward(x))
    loss.backward()
    assert shared.fc.weight.grad is not None and own.fc.weight.grad is not None
    # alpha = beta = 1: no distillation, the term is the shared model's cross-entropy alone
    plain = MutualLearning(Pair(1), "fc", alpha=1.0, beta=1.0)
    term = plain.loss(None, own(x), labels, batch_forward(x))
    assert term.item() == pytest.approx(
        torch.nn.functional.cross_entropy(plain.shared(x), labels).item()
    )
    # the server's average is installed; another architecture is refused
    sent = p.from_record(ext.end(message(), own, lambda: [])[p.SHARED_MODEL])
    assert set(sent) == {"body.weight", "body.bias", "fc.weight", "fc.bias"}
    zeros = {k: np.zeros_like(v) for k, v in sent.items()}
    ext.begin(message(**{p.SHARED_MODEL: zeros}), own)
    assert not shared.fc.weight.detach().any()
    with pytest.raises(PacketError, match="does not fit this client's"):
        ext.begin(message(**{p.SHARED_MODEL: {"fc.weight": np.zeros((2, 3), np.float32)}}), own)


def test_mentor_mentee_adapts_its_weights_projects_features_and_sends_factors():
    x, labels = torch.randn(8, 2), torch.randint(0, 2, (8,))
    own, mentee = Pair(0), Pair(1)
    ext = MentorMentee(mentee, "fc", own_width=3, mentee_width=3)
    assert set(ext.modules()) == {"shared", "projection"}
    with pytest.raises(PacketError, match="svd-energy"):
        ext.begin(message({p.ENERGY: 1.5}), own)
    ext.begin(message({p.ENERGY: 0.9}), own)
    forward = batch_forward(x)
    features, logits = forward(own, "fc")
    loss = ext.loss(features, logits, labels, forward)
    loss.backward()
    assert ext.projection.weight.grad is not None and mentee.body.weight.grad is not None
    assert own.body.weight.grad is not None  # the hidden loss reaches the mentor's features
    sent = p.from_record(ext.end(message(), own, lambda: [])[p.SHARED_MODEL])
    assert set(p.recover_state(sent)) == {"body.weight", "body.bias", "fc.weight", "fc.bias"}


@pytest.mark.slow
def test_fml_and_fedkd_run_by_name_and_keep_the_shared_model_between_rounds():
    for name, kind in (("fml", FML), ("fedkd", FedKD)):
        grid, out = run_by_name(name, rounds=3)
        assert isinstance(out["strategy"], kind)
        assert train_messages(grid, p.SHARED_MODEL) == [False, False, True, True, True, True]
        assert out["strategy"].shared["fc.weight"].shape == (4, 512)  # the first group's cnn4
        energies = [
            m.content.config_records[p.CONFIG].get(p.ENERGY)
            for m in grid.sent
            if m.metadata.message_type == "train"
        ]
        assert energies == ([None] * 6 if name == "fml" else [0.95] * 2 + [0.96] * 2 + [0.97] * 2)


def test_methods_with_a_shared_model_need_one_class_count_and_its_task():
    found = problems(compose("federation=tiny strategy=fml"))
    assert any("strategy fml shares a shared model" in f and "same class count" in f for f in found)
    found = problems(compose("federation=tiny_htfe strategy=fedkd strategy.model=bert_tiny"))
    assert any("the shared model 'bert_tiny' solves text_classification" in f for f in found)
    assert problems(compose("federation=htfe2 strategy=fml")) == []


@pytest.mark.slow
def test_a_client_keeps_what_its_method_trains_beside_its_model_in_its_context():
    cfg = compose(
        "federation=tiny_htfe strategy=fedkd federation.examples_per_client=32 local_steps=1"
    )
    app = make_client_app(lambda context: cfg)
    context = Context(
        run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )

    def train(server_round: int) -> Message:
        config = {p.ROUND: server_round, p.SEND_PACKET: False, p.SHARE: "none", p.ENERGY: 0.95}
        return app(message(config), context)

    assert not train(1).has_error()
    key = "mergenet.extension.projection"
    kept = context.state.array_records[key].to_torch_state_dict()
    assert "mergenet.extension.shared" in context.state.array_records
    fresh = cfg.build_extension(nn.Linear(512, 4), "", 4).modules()["projection"].weight
    assert not torch.equal(kept["weight"], fresh)  # round 1 trained it
    # the projection is never sent: round 2 must go on from the node's own (zeroed here)
    context.state.array_records[key] = ArrayRecord({"weight": torch.zeros_like(fresh)})
    assert not train(2).has_error()
    after = context.state.array_records[key].to_torch_state_dict()["weight"]
    assert 0 < after.norm() < 0.1 * fresh.norm()


@pytest.mark.slow
def test_mergenets_client_steps_on_the_hook_reply_as_the_protocols_receive_and_reply():
    grid, _ = run_by_name("mergenet", rounds=2)
    msg = next(
        m
        for m in grid.sent
        if m.metadata.message_type == "train" and p.MERGED in m.content.array_records
    )
    cfg = compose("federation=tiny_htfe strategy=mergenet federation.examples_per_client=64")
    work = build_workload(cfg, msg.metadata.dst_node_id % cfg.num_clients)
    identity, metrics = work.identity, {p.NUM_EXAMPLES: 64.0}
    on_protocol, on_hook = deepcopy(work.model), deepcopy(work.model)

    installed = mc.receive(msg, on_protocol, work.layers, rank=cfg.rank)
    expected = mc.reply(msg, on_protocol, work.layers, identity, installed, metrics, rank=cfg.rank)

    ext = cfg.build_extension(on_hook, work.head, 4, work.layers)
    assert isinstance(ext, MergeNetClient)
    mc.load_group(msg, on_hook)
    ext.begin(msg, on_hook)
    assert set(ext.installed) == set(installed) != set()
    records = ext.end(msg, on_hook, lambda: [])
    got = mc.answer(
        msg, on_hook, work.layers, identity, metrics, records=records, manifest=ext.manifest
    )
    assert set(got.content.array_records) == set(expected.content.array_records)
    for key in expected.content.array_records:
        want, have = (p.from_record(m.content.array_records[key]) for m in (expected, got))
        assert all(np.array_equal(want[k], have[k]) for k in want), key
    assert got.content.config_records[p.IDENTITY] == expected.content.config_records[p.IDENTITY]


def test_a_client_scored_on_its_local_test_reports_the_global_test_beside_it():
    for split, expected in (("local", True), ("test", False)):
        cfg = compose(f"federation=tiny_htfe eval_split={split} federation.test_examples=32")
        app = make_client_app(lambda context, cfg=cfg: cfg)
        context = Context(
            run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
        )
        content = RecordDict({p.CONFIG: ConfigRecord({p.ROUND: 1})})
        out = app(Message(content, dst_node_id=0, message_type="evaluate"), context)
        metrics = out.content.metric_records[p.METRICS]
        assert ("global_accuracy" in metrics and "global_chance" in metrics) is expected
        assert "accuracy" in metrics and "chance" in metrics


def test_class_means_come_from_the_model_with_batchnorm_re_estimated_as_for_evaluation():
    from simulations.client_app import embed
    from simulations.tasks import calibrated_batchnorm

    cfg = compose("federation=tiny_htfe strategy=fd federation.examples_per_client=64")
    work = build_workload(cfg, 0)  # cnn4: BatchNorm
    work.task.train(work.model, work.train_set, steps=2, batch_size=16, seed=0)
    _, logits, _ = next(iter(embed(cfg, work)))
    scoring = dict(batch_size=cfg.eval_batch_size, device="cpu", numerics=cfg.numerics())
    calibrated = calibrated_batchnorm(
        work.model, work.train_set, cfg.eval_batch_size, torch.device("cpu"), cfg.numerics()
    )
    _, expected, _ = next(iter(work.task.embed(calibrated, work.train_set, "fc", **scoring)))
    _, stale, _ = next(iter(work.task.embed(work.model, work.train_set, "fc", **scoring)))
    assert torch.allclose(logits, expected) and not torch.allclose(logits, stale, atol=1e-3)


def test_fml_kl_per_class_is_one_class_count_weaker_as_in_htfllib():
    torch.manual_seed(0)
    logits, shared_logits = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))

    def kl_term(kl: str) -> float:
        ext = MutualLearning(nn.Linear(2, 5), "fc", alpha=0.0, beta=1.0, kl=kl)
        total = ext.loss(
            torch.zeros(6, 2), logits, labels, lambda other, head: (None, shared_logits)
        )
        ce = F.cross_entropy(shared_logits, labels) - F.cross_entropy(logits, labels)
        return (total - ce).item()  # what is left: KL(shared ‖ own)

    assert kl_term("batchmean") > 0
    assert kl_term("batchmean") == pytest.approx(5 * kl_term("mean"), rel=1e-5)
    with pytest.raises(ConfigError, match="strategy.kl must be one of"):
        compose("strategy=fml strategy.kl=sum")
