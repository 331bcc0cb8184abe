"""HtFLlib's methods as it defines them: FedProto's plain mean and nearest-prototype scoring,
LG-FedAvg scored with the global head, and the server-trained methods FedTGP (global
prototypes with a margin) and FedGH (a global head trained on prototypes)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from harness import FakeGrid, app_nodes, set_task_identity
from mergenet_fl import PacketError
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply
from mergenet_fl.flower.extension import ClassMeans, GlobalHead, NearestMean, SharedHead
from mergenet_fl.flower.fedproto import FedProto
from mergenet_fl.flower.server_trained import FedGH, FedTGP, class_gap
from simulations.client_app import make_client_app
from simulations.config import ConfigError, compose
from simulations.preflight import problems


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def reply(client: str, means: list, counts: list) -> ClientReply:
    record = {"means": np.array(means, np.float32), "counts": np.array(counts, np.float32)}
    content = RecordDict({p.PROTOS: p.to_record(record)})
    return ClientReply(0, p.ClientIdentity(client, "g"), "", {p.NUM_EXAMPLES: 1.0}, content, 0)


def message(kind: str = "evaluate", **records: dict) -> Message:
    content = RecordDict({p.CONFIG: ConfigRecord({})})
    for key, value in records.items():
        content[key] = p.to_record(value)
    return Message(content, dst_node_id=1, message_type=kind)


class Tiny(nn.Module):
    """Features are the input itself: ``fc`` sees ``x``."""

    def __init__(self, width: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def absorbed(strategy: FedProto, replies: list[ClientReply], server_round: int = 1) -> dict:
    for r in replies:
        strategy.validate(server_round, r)
    return strategy.absorb(server_round, replies)


def test_fedproto_mean_is_plain_over_the_clients_that_have_the_class():
    replies = [
        reply("a", [[1.0, 1.0], [0.0, 0.0]], [30, 0]),
        reply("b", [[5.0, 5.0], [2.0, 4.0]], [10, 2]),
    ]
    plain = FedProto()
    absorbed(plain, replies)
    assert np.allclose(plain.means, [[3.0, 3.0], [2.0, 4.0]])  # not 30:10 weighted (2.0)
    weighted = FedProto(mean="weighted")
    absorbed(weighted, replies)
    assert np.allclose(weighted.means[0], [2.0, 2.0])
    # the evaluate messages carry the prototypes the clients are scored by
    sent = plain.evaluate_records(2, {7: p.ClientIdentity("a", "g")})
    assert np.allclose(p.from_record(sent[7][p.PROTOS])["means"], plain.means)
    with pytest.raises(ValueError, match="mean='median'"):
        FedProto(mean="median")


def test_nearest_prototype_scoring_replaces_the_head_in_a_copy():
    model = Tiny()
    protos = {"means": np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], np.float32)}
    protos["counts"] = np.array([1, 1, 0], np.float32)  # class 2 was never seen
    ext = ClassMeans(3, score="prototype", head="fc")
    scored = ext.scored(message(protos=protos), model)
    x = torch.tensor([[0.5, 0.2], [3.0, 1.0], [0.1, 3.9]])
    # nearest seen prototype: class 0, class 1, and class 0 (class 2 is ruled out)
    assert scored(x).argmax(1).tolist() == [0, 1, 0]
    expected = -((x[0] - torch.tensor([4.0, 0.0])) ** 2).mean()
    assert scored(x)[0, 1].item() == pytest.approx(expected.item())
    assert isinstance(scored.fc, NearestMean) and isinstance(model.fc, nn.Linear)
    assert ClassMeans(3, score="head", head="fc").scored(message(protos=protos), model) is model
    assert ext.scored(message(), model) is model  # no prototypes yet: its own head
    with pytest.raises(ValueError, match="'prototype' for features"):
        ClassMeans(3, of="logits", score="prototype", head="fc")


def test_lgfedavg_scores_with_the_global_head_and_leaves_the_model_as_trained():
    model = Tiny()
    head = {"weight": np.full((3, 2), 0.5, np.float32), "bias": np.zeros(3, np.float32)}
    scored = SharedHead("fc").scored(message(head=head), model)
    assert torch.allclose(scored.fc.weight, torch.full((3, 2), 0.5))
    assert not torch.allclose(model.fc.weight, torch.full((3, 2), 0.5))
    assert SharedHead("fc", score="local").scored(message(head=head), model) is model


def test_class_gap_is_the_largest_nearest_class_distance_of_the_plain_centres():
    replies = [
        reply("a", [[0.0, 0.0], [3.0, 0.0], [0.0, 0.0]], [1, 1, 0]),
        reply("b", [[0.0, 0.0], [3.0, 0.0], [0.0, 10.0]], [1, 1, 1]),
    ]
    # centres (0,0), (3,0), (0,10): nearest-class distances 3, 3 and 10
    for r in replies:
        FedProto().validate(1, r)
    parts = [r.extras["means"] for r in replies]
    assert class_gap(parts) == pytest.approx(10.0)
    assert class_gap(parts[:1]) == pytest.approx(3.0)  # class 2 absent from client a


def clustered(seed: int, clients: int = 4, classes: int = 3, width: int = 8) -> list:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, width)) * 3
    return [
        reply(f"c{i}", centres + rng.normal(size=(classes, width)) * 0.3, [5] * classes)
        for i in range(clients)
    ]


def test_fedtgp_learns_prototypes_that_separate_the_classes_with_its_margin():
    replies = clustered(0)
    strategy = FedTGP(margin_threshold=2.0, server_epochs=100, server_lr=0.1, seed=3)
    log = absorbed(strategy, replies)
    assert log["margin"] == pytest.approx(2.0)  # min(gap ≈ 5, threshold 2)
    assert log["pairs"] == 4 * 3 and log["classes"] == 3
    prototypes = torch.from_numpy(strategy.means)
    for r in replies:  # every client's class mean is nearest its class's global prototype
        means = torch.from_numpy(r.extras["means"][0].astype(np.float32))
        assert torch.cdist(means, prototypes).argmin(1).tolist() == [0, 1, 2]
    assert np.array_equal(strategy.counts, np.ones(3, np.float32))  # every class goes out
    # the same seed, the same prototypes; a checkpoint restores them
    again = FedTGP(margin_threshold=2.0, server_epochs=100, server_lr=0.1, seed=3)
    absorbed(again, clustered(0))
    assert np.array_equal(again.means, strategy.means)
    restored = FedTGP(margin_threshold=2.0, server_epochs=100, server_lr=0.1, seed=3)
    restored.load_state_dict(strategy.state_dict())
    absorbed(restored, replies, 2)
    absorbed(strategy, replies, 2)
    assert np.array_equal(restored.means, strategy.means)


def test_fedtgp_margin_pushes_prototypes_apart():
    def spread(threshold: float) -> float:
        strategy = FedTGP(margin_threshold=threshold, server_epochs=100, server_lr=0.1, seed=0)
        absorbed(strategy, clustered(1))
        return float(torch.pdist(torch.from_numpy(strategy.means)).min())

    assert spread(50.0) > spread(0.0)


def test_fedgh_trains_one_head_on_the_prototypes_and_sends_it_to_train_and_evaluate():
    replies = clustered(2)
    strategy = FedGH(server_epochs=100, server_lr=0.1, seed=0)
    absorbed(strategy, replies)
    nodes = {5: p.ClientIdentity("c0", "g")}
    train = strategy.train_records(2, nodes)[5]
    assert set(train) == {p.HEAD} and set(strategy.evaluate_records(2, nodes)[5]) == {p.HEAD}
    head = nn.Linear(8, 3)
    arrays = p.from_record(train[p.HEAD])
    head.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    for r in replies:  # the head classifies every client's prototypes
        assert head(torch.from_numpy(r.extras["means"][0].astype(np.float32))).argmax(
            1
        ).tolist() == [0, 1, 2]
    with pytest.raises(PacketError, match="needs one feature width"):
        strategy.validate(2, reply("odd", [[0.0] * 4] * 3, [1, 1, 1]))

    # the client installs it before training and scores with it, in a copy
    model = Tiny(width=8)
    client = GlobalHead(3, "fc")
    assert client.scored(message(**{p.HEAD: arrays}), model).fc.weight.data.equal(head.weight.data)
    assert not model.fc.weight.data.equal(head.weight.data)
    client.begin(message("train", **{p.HEAD: arrays}), model)
    assert model.fc.weight.data.equal(head.weight.data) and not client.adds_loss


def run_by_name(strategy: str, rounds: int = 2) -> tuple[FakeGrid, list[dict], object]:
    cfg = compose(
        f"federation=tiny_htfe strategy={strategy} num_rounds={rounds} "
        "federation.examples_per_client=64 federation.test_examples=64 "
        "strategy.server_epochs=5"
    )
    assert problems(cfg) == []
    grid = FakeGrid(app_nodes(make_client_app(lambda context: cfg), cfg.num_clients))
    records: list[dict] = []
    strat = cfg.build_strategy(on_round=records.append)
    strat.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=60)
    assert not [r.error.reason for r in grid.replies if r.has_error()]
    assert all(not r["dropped"] for r in records)
    return grid, records, strat


def carried(grid: FakeGrid, kind: str, key: str) -> list[bool]:
    return [key in m.content.array_records for m in grid.sent if m.metadata.message_type == kind]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "key"), [("fedtgp", p.PROTOS), ("fedgh", p.HEAD)])
def test_server_trained_methods_run_by_name(name: str, key: str):
    grid, records, strategy = run_by_name(name)
    assert carried(grid, "train", key) == [False, False, True, True]
    assert carried(grid, "evaluate", key) == [True] * 4  # scored with what the server learnt
    trains = [r for r in records if r["stage"] == "train"]
    assert all(r["server"]["server_loss"] >= 0 for r in trains)
    assert isinstance(strategy, FedTGP if name == "fedtgp" else FedGH)


def test_server_trained_methods_refuse_federations_without_one_head_shape():
    for name in ("fedtgp", "fedgh"):
        found = problems(compose(f"federation=paper strategy={name}"))
        assert any("cnn4-cifar10 (10, 512), resnet8-cifar10 (10, 64)" in f for f in found)
    with pytest.raises(ConfigError, match="strategy.score must be one of"):
        compose("strategy=fedtgp strategy.score=logits")
    with pytest.raises(ConfigError, match="strategy.score must be one of"):
        compose("strategy=lgfedavg strategy.score=prototype")
