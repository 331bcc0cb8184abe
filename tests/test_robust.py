"""Defences against a well-formed poisoning client: robust group averages, screening of
packets and gradient pieces against the others of a round."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message

from harness import FakeGrid, TinyClient, mlp, set_task_identity
from mergenet_fl import AdapterConfig, HypernetConfig
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
            grid.tamper = lambda nid, msg: (
                scale_record(msg, p.SHARED, 100.0) if nid == attacker else msg
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
        grid.tamper = lambda nid, msg: scale_record_b(msg, factor) if nid == attacker else msg
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
