"""The untrained adapter is the neutral element: MergeNet is then exactly the baseline it
extends, with client sampling, dropped replies and stale packets (the paper's invariants)."""

import pytest
import torch
from flwr.app import ArrayRecord

from harness import RANK, FakeGrid, TinyClient, set_task_identity
from mergenet_fl import AdapterConfig, HypernetConfig, LayerSpec, install_merged, select_layers
from mergenet_fl.flower import GroupFedAvg, LocalOnly, MergeNet
from mergenet_fl.selection import get_matrix


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def clients() -> list[TinyClient]:
    mlps = [TinyClient(f"m{i}", "mlp", i) for i in range(3)]
    return mlps + [TinyClient(f"c{i}", "cnn", 10 + i) for i in range(2)]


def frozen(share: str, **kwargs) -> MergeNet:
    adapter = AdapterConfig(rank=RANK, dim=8, heads=2, layers=1)
    hypernet = HypernetConfig(adapter=adapter, lr=0.0, group_targets=share != "none")
    return MergeNet(hypernet=hypernet, share=share, **kwargs)


def run(strategy, rounds: int = 4) -> tuple[dict, list]:
    """Final client weights and the per-round records, with 60 % of clients sampled per round
    and the replies of the mlp clients lost in round 2 (they trained; their packets are
    stale from then on)."""
    grid = FakeGrid(clients())
    records = []
    strategy.on_round = records.append
    lost = {grid.node_of(f"m{i}") for i in range(3)}
    for rnd in range(1, rounds + 1):
        grid.lose = lost if rnd == 2 else set()
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1, timeout=5)
        strategy.round_offset += 1
    weights = {c.identity.client_id: c.model().state_dict() for c in grid.nodes.values()}
    return weights, records


def assert_same(a: tuple[dict, list], b: tuple[dict, list]) -> None:
    (wa, ra), (wb, rb) = a, b
    for cid in wa:
        for key, value in wa[cid].items():
            assert torch.equal(value, wb[cid][key]), (cid, key)
    sampled = [(r["round"], r["stage"], sorted(r["clients"])) for r in ra]
    assert sampled == [(r["round"], r["stage"], sorted(r["clients"])) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for cid, metrics in x["clients"].items():
            for key in ("train_loss", "accuracy"):
                assert metrics.get(key) == y["clients"][cid].get(key), (x["round"], cid, key)


def test_untrained_mergenet_sharing_groups_is_exactly_group_fedavg():
    kwargs = dict(fraction_train=0.6, fraction_evaluate=0.6, min_available_nodes=5)
    mergenet = run(frozen("all", **kwargs))
    assert any("pieces" in str(r["server"]) for r in mergenet[1])  # transfer rounds happened
    assert_same(mergenet, run(GroupFedAvg(**kwargs)))


@pytest.mark.slow
def test_every_transfer_round_records_who_learns_from_whom():
    _, records = run(frozen("none", fraction_train=1.0, min_available_nodes=5))
    transfers = [r["server"] for r in records if r["stage"] == "train" and r["server"]["transfer"]]
    assert len(transfers) == 3 and all("step_norm" in s for s in transfers)
    for server in transfers:
        assert server["lambda"] and set(server["targets"]) <= {"m0", "m1", "m2", "c0", "c1"}
        for layers in server["targets"].values():
            for stats in layers.values():
                assert stats["transfer_effect"] == 0.0  # a frozen adapter: no transfer
                assert sum(stats["attention"].values()) == pytest.approx(1.0)


def test_untrained_transfer_only_is_exactly_local_only():
    kwargs = dict(fraction_train=0.6, fraction_evaluate=0.6, min_available_nodes=5)
    assert_same(run(frozen("none", **kwargs)), run(LocalOnly(**kwargs)))


def test_a_stale_packet_does_not_undo_training():
    # Factors the adapter was given three rounds ago: an identity adapter returns them, and the
    # client subtracts exactly them, so its current weight stays as it is.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8))
    layers = select_layers(model, LayerSpec(["0"]))
    old_a, old_b = torch.randn(8, 3), torch.randn(3, 12)
    before = get_matrix(model, layers[0])
    install_merged(model, layers, {"0": (old_a, old_b)}, rank=3, own={"0": (old_a, old_b)})
    assert torch.equal(get_matrix(model, layers[0]), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pieces_of_a_low_precision_model_start_from_the_value_written(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8)).to(dtype)
    layers = select_layers(model, LayerSpec(["0"]))
    a, b = torch.randn(8, 3), torch.randn(3, 12)
    own = (torch.randn(8, 3) * 0.1, torch.randn(3, 12) * 0.1)
    (installed,) = install_merged(model, layers, {"0": (a, b)}, rank=3, own={"0": own}).values()
    assert torch.equal(installed.installed, get_matrix(model, layers[0]))  # rounded, read back
