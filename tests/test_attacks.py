"""The robustness study's attacks: well-formed poisoning replies pass every check of the
server (which is why the defences exist) and change what they aim at."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, RecordDict

from harness import FakeGrid, TinyClient, mlp, set_task_identity
from mergenet_fl import AdapterConfig, HypernetConfig
from mergenet_fl.flower import MergeNet
from mergenet_fl.flower import protocol as p
from simulations.attacks import KINDS, MARGIN, Attack
from simulations.config import ConfigError, compose

LIMIT = 50.0  # the strategy's max_factor_norm here


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def attacked_run(attack: Attack | None, screen=None, rounds=3):
    grid = FakeGrid([TinyClient(f"m{i}", "mlp", i) for i in range(4)])
    bad = grid.node_of("m3")
    if attack is not None:
        grid.tamper = lambda nid, msg: attack.apply(msg, LIMIT, seed=nid) if nid == bad else msg
    hypernet = HypernetConfig(adapter=AdapterConfig(rank=4, dim=8, heads=2, layers=1))
    strat = MergeNet(hypernet=hypernet, share="all", max_factor_norm=LIMIT, screen=screen)
    records = []
    strat.on_round = records.append
    strat.start(
        grid=grid, initial_arrays=ArrayRecord(mlp(0).state_dict()), num_rounds=rounds, timeout=10
    )
    return strat, [r for r in records if r["stage"] == "train"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_attack_passes_the_servers_checks(kind):
    strat, train = attacked_run(Attack(kind, factor=5.0))
    assert all(not r.get("dropped") for r in train), [r.get("dropped") for r in train]
    assert [r["server"].get("pieces") for r in train] == [None, 4.0, 4.0]
    assert "m3" in strat.bank


def test_packet_attacks_reach_the_bank_and_the_model_attack_the_group_average():
    honest, _ = attacked_run(None)
    scaled, _ = attacked_run(Attack("scale_packet"))
    lf = scaled.bank.get("m3").packet.layers["3"]
    largest = max(float(np.linalg.norm(lf.a)), float(np.linalg.norm(lf.b)))
    assert largest == pytest.approx(MARGIN * LIMIT, rel=1e-4)
    noisy, _ = attacked_run(Attack("random_packet"))
    mine, theirs = noisy.bank.get("m3").packet.layers["3"], honest.bank.get("m3").packet.layers["3"]
    assert float(np.linalg.norm(mine.b)) == pytest.approx(float(np.linalg.norm(theirs.b)), rel=0.2)
    replaced, _ = attacked_run(Attack("replace_model", factor=100.0))
    assert (
        np.abs(replaced.group_arrays["mlp"]["3.weight"]).max()
        > 10 * np.abs(honest.group_arrays["mlp"]["3.weight"]).max()
    )


def test_screening_catches_scaled_pieces():
    _, train = attacked_run(Attack("scale_pieces", factor=100.0), screen=3.0)
    assert [r["server"].get("screened_pieces") for r in train[1:]] == [["m3"], ["m3"]]


def federation_with(attack: str) -> str:
    """federation=tiny_htfe's cnn4 group as two honest clients and one with ``attack``."""
    group = "group: cnn4-images, arch: cnn4, task: image_classification, "
    group += "dataset: synthetic-images, layers: [fc]"
    return (
        f"federation=tiny_htfe 'federation.clients=[{{{group}, count: 2}}, "
        f"{{{group}, count: 1, attack: {attack}}}]'"
    )


def test_an_attack_is_configured_per_client_group_and_checked():
    cfg = compose(federation_with("{kind: flip_pieces, factor: 1.0}"))
    assert [c.attack for c in cfg.clients] == [None, Attack("flip_pieces", 1.0)]
    assert cfg.client(2)[0].attack is not None and cfg.client(1)[0].attack is None
    with pytest.raises(ConfigError, match=r"clients\[1\]\.attack: attack kind 'steal'"):
        compose(federation_with("{kind: steal}"))


def test_model_replacement_noises_what_each_method_averages_and_keeps_the_counts():
    means = np.ones((3, 4), dtype=np.float32)
    counts = np.array([5.0, 0.0, 2.0], dtype=np.float32)
    head = {"weight": np.ones((3, 4), dtype=np.float32), "bias": np.zeros(3, dtype=np.float32)}
    content = RecordDict(
        {
            p.PROTOS: p.to_record({"means": means, "counts": counts}),
            p.HEAD: p.to_record(head),
            p.PACKET: p.to_record({"fc/A": means}),
        }
    )
    reply = Attack("replace_model", factor=10.0).apply(
        Message(content, dst_node_id=1, message_type="train"), LIMIT, seed=0
    )
    protos = p.from_record(reply.content.array_records[p.PROTOS])
    np.testing.assert_array_equal(protos["counts"], counts)
    assert np.linalg.norm(protos["means"]) == pytest.approx(10 * np.linalg.norm(means), rel=1e-5)
    assert not np.allclose(protos["means"] / np.linalg.norm(protos["means"]), means / 12**0.5)
    noisy_head = p.from_record(reply.content.array_records[p.HEAD])
    assert np.linalg.norm(noisy_head["weight"]) == pytest.approx(10 * 12**0.5, rel=1e-5)
    np.testing.assert_array_equal(  # not what replace_model aims at
        p.from_record(reply.content.array_records[p.PACKET])["fc/A"], means
    )


def test_an_attackers_share_of_the_adapters_gradient_is_logged():
    _, honest = attacked_run(None)
    _, scaled = attacked_run(Attack("scale_pieces", factor=50.0))
    for train in (honest, scaled):
        shares = [r["server"]["piece_shares"] for r in train[1:]]
        assert all(sorted(s) == ["m0", "m1", "m2", "m3"] for s in shares)
        assert all(sum(s.values()) == pytest.approx(1.0) for s in shares)
    assert max(s["m3"] for s in (r["server"]["piece_shares"] for r in honest[1:])) < 0.6
    assert min(s["m3"] for s in (r["server"]["piece_shares"] for r in scaled[1:])) > 0.9
