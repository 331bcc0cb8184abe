"""Defences against a well-formed poisoning client: robust group averages, screening of
packets and gradient pieces against the others of a round."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message

from harness import FakeGrid, TinyClient, mlp, set_task_identity
from mergenet_fl import (
    AdapterConfig,
    HypernetConfig,
    Hypernetwork,
    KnowledgeBank,
    KnowledgePacket,
    LayerFactors,
    factorize,
)
from mergenet_fl.flower import GroupFedAvg, MergeNet
from mergenet_fl.flower import protocol as p
from mergenet_fl.robust import above_median, against_median, combine
from simulations.config import compose
from simulations.preflight import problems


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def test_a_robust_average_ignores_one_huge_value_that_moves_the_mean():
    honest = [np.full(3, v, dtype=np.float32) for v in (1.0, 1.1, 0.9, 1.0)]
    values = [*honest, np.full(3, 1e4, dtype=np.float32)]
    weights = [1.0] * 5
    assert combine(values, weights, "mean")[0] > 1000
    assert combine(values, weights, "median")[0] == pytest.approx(1.0)
    assert combine(values, weights, "trimmed", trim=0.2)[0] == pytest.approx(1.0333, abs=1e-3)
    assert combine(values, weights, "median").dtype == np.float32
    with pytest.raises(ValueError, match="choose one of"):
        combine(values, weights, "mode")
    with pytest.raises(ValueError, match="trim"):
        combine(values, weights, "trimmed", trim=0.5)


def test_screening_needs_three_to_compare_and_flags_norm_and_direction():
    assert above_median([1.0, 100.0], 3.0) == [False, False]
    assert above_median([1.0, 1.2, 0.9, 50.0], 3.0) == [False, False, False, True]
    base = np.ones((2, 3))
    cosines = against_median([base, base * 1.1, base * 0.9, -base])
    assert cosines[:3] == pytest.approx([1.0, 1.0, 1.0]) and cosines[3] == pytest.approx(-1.0)


def mlp_federation():
    """Four clients of one group, on their own data, from the federation's one initial model
    (as ``initial_arrays`` below): their weights stay alike, as a group's do."""
    return FakeGrid([TinyClient(f"m{i}", "mlp", i) for i in range(4)])


def initial() -> ArrayRecord:
    return ArrayRecord(mlp(0).state_dict())


def scale_record(msg: Message, key: str, factor: float) -> Message:
    """``msg`` with its record ``key`` (when it has one) times ``factor``."""
    if key not in msg.content.array_records:
        return msg
    arrays = p.from_record(msg.content.array_records[key])
    msg.content.array_records[key] = p.to_record({k: v * factor for k, v in arrays.items()})
    return msg


@pytest.mark.parametrize("average", ["median", "trimmed"])
def test_a_robust_group_average_is_not_steered_by_one_replaced_model(average):
    runs = {}
    for name, attack in (("honest", False), ("attacked", True)):
        grid = mlp_federation()
        attacker = grid.node_of("m3")
        if attack:  # model replacement: m3 shares its parameters scaled up 100 times
            grid.tamper = lambda nid, msg, bad=attacker: (
                scale_record(msg, p.SHARED, 100.0) if nid == bad else msg
            )
        strat = GroupFedAvg(average=average, trim=0.25)
        strat.start(grid=grid, initial_arrays=initial(), num_rounds=1, timeout=10)
        runs[name] = strat.group_arrays["mlp"]
    honest, attacked = runs["honest"], runs["attacked"]
    for key in honest:
        spread = np.abs(honest[key]).max() + 1e-6
        assert np.abs(attacked[key] - honest[key]).max() < 2 * spread  # stays honest-sized


def test_the_plain_mean_is_steered_by_the_same_attack():
    grid = mlp_federation()
    attacker = grid.node_of("m3")
    grid.tamper = lambda nid, msg: scale_record(msg, p.SHARED, 100.0) if nid == attacker else msg
    strat = GroupFedAvg()
    strat.start(grid=grid, initial_arrays=initial(), num_rounds=1, timeout=10)
    weight = strat.group_arrays["mlp"]["3.weight"]
    assert np.abs(weight).max() > 5  # an honest layer's weights are well under 1


def mergenet(screen):
    hypernet = HypernetConfig(adapter=AdapterConfig(rank=4, dim=8, heads=2, layers=1))
    return MergeNet(hypernet=hypernet, share="none", screen=screen)


@pytest.mark.parametrize(
    ("factor", "why"), [(30.0, "above 3 x the group's median"), (-1.0, "points away")]
)
def test_screening_keeps_a_scaled_or_flipped_packet_out_of_the_bank(factor, why, caplog):
    for screen, stored in ((None, True), (3.0, False)):
        grid = mlp_federation()
        attacker = grid.node_of("m3")
        grid.tamper = lambda nid, msg, bad=attacker: (
            scale_record_b(msg, factor) if nid == bad else msg
        )
        strat = mergenet(screen)
        records = []
        strat.on_round = records.append
        strat.start(grid=grid, initial_arrays=initial(), num_rounds=2, timeout=10)
        assert ("m3" in strat.bank) == stored, screen
        assert sorted(c for c in strat.bank if c != "m3") == ["m0", "m1", "m2"]
        if not stored:
            assert why in caplog.text
            train = [r for r in records if r["stage"] == "train"]
            assert train[0]["server"]["screened_packets"] == ["m3"]


def scale_record_b(msg: Message, factor: float) -> Message:
    """The packet's B factors (when it has a packet) times ``factor``: its weight scales."""
    if p.PACKET not in msg.content.array_records:
        return msg
    arrays = p.from_record(msg.content.array_records[p.PACKET])
    scaled = {k: v * factor if k.endswith("/B") else v for k, v in arrays.items()}
    msg.content.array_records[p.PACKET] = p.to_record(scaled)
    return msg


def test_screening_scales_a_clients_pieces_down_to_a_multiple_of_the_median():
    strat = mergenet(2.0)
    pieces = {
        f"c{i}": {"l": (torch.full((2, 2), s), torch.full((2, 3), s))}
        for i, s in enumerate((1.0, 1.1, 0.9, 40.0))
    }
    norms = {c: sum(float(t.norm() ** 2) for t in v["l"]) ** 0.5 for c, v in pieces.items()}
    median = float(np.median(list(norms.values())))
    out, scaled = strat._screen_pieces(pieces)
    assert scaled == ["c3"]
    got = sum(float(t.norm() ** 2) for t in out["c3"]["l"]) ** 0.5
    assert got == pytest.approx(2.0 * median, rel=1e-5)
    assert all(torch.equal(out[c]["l"][0], pieces[c]["l"][0]) for c in ("c0", "c1", "c2"))


def test_a_wrong_defence_setting_is_refused_before_anything_runs():
    found = problems(compose("federation=tiny strategy=groupfedavg strategy.average=mode"))
    assert any("strategy.average" in f and "mode" in f for f in found), found
    found = problems(compose("federation=tiny strategy=mergenet strategy.screen=0.5"))
    assert any("strategy.screen must be" in f for f in found), found


def twins(**kwargs):
    """Two hypernetworks of one config (SGD 0.1, no clipping), away from the identity."""
    cfg = HypernetConfig(
        adapter=AdapterConfig(rank=4, dim=8, heads=2, layers=1, max_source_tokens=8),
        optimizer="sgd",
        lr=0.1,
        max_grad_norm=None,
        **kwargs,
    )
    out = []
    for _ in range(2):
        hn = Hypernetwork(cfg)
        hn.register_shapes([(10, 32), (12, 18)])
        with torch.no_grad():
            for i, par in enumerate(hn.adapter.parameters()):
                par.copy_(torch.randn(par.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
        out.append(hn)
    return out


def five_clients() -> KnowledgeBank:
    bank = KnowledgeBank()
    for i in range(5):
        w = torch.randn(10, 32, generator=torch.Generator().manual_seed(i))
        bank.put(
            f"c{i}",
            KnowledgePacket({"fc": LayerFactors(*factorize(w, 4), (10, 32), "linear")}),
            group="g",
            round=1,
        )
    w = torch.randn(12, 18, generator=torch.Generator().manual_seed(9))
    bank.put(
        "s",
        KnowledgePacket({"w": LayerFactors(*factorize(w, 4), (12, 18), "linear")}),
        group="h",
        round=1,
        send_only=True,
    )
    return bank


def pieces_for(merged, scale_of=None, factor=1.0):
    out = {}
    for i, (cid, layers) in enumerate(sorted(merged.items())):
        gen = torch.Generator().manual_seed(100 + i)
        s = factor if cid == scale_of else 1.0
        out[cid] = {
            n: (torch.randn(a.shape, generator=gen) * s, torch.randn(b.shape, generator=gen) * s)
            for n, (a, b) in layers.items()
        }
    return out


def step(hn, bank, pieces_of, chunk_rounds=2):
    merged, generation = hn.generate(bank, [f"c{i}" for i in range(5)], round=chunk_rounds)
    before = [p.detach().clone() for p in hn.adapter.parameters()]
    hn.update(generation, pieces_of(merged))
    return torch.cat(
        [(p.detach() - b).reshape(-1) for p, b in zip(hn.adapter.parameters(), before, strict=True)]
    )


@pytest.mark.parametrize("chunk_size", [64, 2])  # the graph kept, or recomputed in chunks
def test_a_trimmed_combination_with_nothing_trimmed_is_the_sum(chunk_size):
    summed, trimmed = (
        twins(chunk_size=chunk_size),
        twins(chunk_size=chunk_size, combine="trimmed", trim=0.0),
    )
    bank = five_clients()
    a = step(summed[0], bank, pieces_for)
    b = step(trimmed[0], bank, pieces_for)
    assert a.norm() > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("combine", ["median", "trimmed"])
def test_one_client_with_huge_pieces_cannot_steer_a_robust_adapter_step(combine):
    bank = five_clients()
    honest = step(twins(combine=combine)[0], bank, pieces_for)
    attacked = step(twins(combine=combine)[0], bank, lambda m: pieces_for(m, "c4", 1000.0))
    plain = step(twins()[0], bank, lambda m: pieces_for(m, "c4", 1000.0))
    plain_honest = step(twins()[0], bank, pieces_for)
    assert (plain - plain_honest).norm() > 50 * plain_honest.norm()  # the sum follows it
    assert (attacked - honest).norm() < 2 * honest.norm()  # a robust step stays honest-sized
