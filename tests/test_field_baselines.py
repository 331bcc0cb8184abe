"""The field's heterogeneous-FL baselines on the shared client protocol: LG-FedAvg (an averaged
head) and FedProto (class prototypes), server and client sides."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from harness import FakeGrid, app_nodes, set_task_identity
from mergenet_fl import PacketError
from simulations.client_app import make_client_app
from simulations.config import compose
from simulations.preflight import problems
from strategies import protocol as p
from strategies.base import ClientReply
from strategies.extension import ClassMeans, SharedHead
from strategies.fedproto import FD, FedProto
from strategies.lgfedavg import LGFedAvg


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
    strategy = FedProto()
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


def message(**records: dict) -> Message:
    content = RecordDict({p.CONFIG: ConfigRecord()})
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
    loss = ext.loss(features, torch.zeros(3, 3), labels)
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
    assert ClassMeans(3).loss(features, torch.zeros(3, 3), labels) is None  # no prototypes yet


def test_fd_pulls_logits_not_features_and_sends_mean_logits():
    ext = ClassMeans(num_classes=2, weight=1.0, of="logits")
    ext.begin(message(logits=protos([[2.0, 0.0], [0.0, 2.0]], [3, 3])), Tiny())
    features = torch.zeros(2, 5, requires_grad=True)  # any width: FD does not read them
    logits = torch.zeros(2, 2, requires_grad=True)
    ext.loss(features, logits, torch.tensor([0, 1])).backward()
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


def test_fd_runs_by_name():
    grid, out = run_by_name("fd")
    assert train_messages(grid, p.LOGITS) == [False, False, True, True]
    assert out["strategy"].means.shape == (4, 4)
    assert isinstance(out["strategy"], FD)
