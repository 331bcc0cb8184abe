from contextlib import contextmanager

import pytest
import torch

from mergenet_fl import (
    AdapterConfig,
    HypernetConfig,
    Hypernetwork,
    KnowledgeBank,
    KnowledgePacket,
    LayerFactors,
    PacketError,
    factorize,
)
from mergenet_fl.lowrank import product_norm

SMALL = AdapterConfig(rank=4, dim=8, heads=2, layers=1, max_source_tokens=8)


def packet(shapes: dict[str, tuple[int, int]], seed: int, rank: int = 4) -> KnowledgePacket:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (m, n) in shapes.items():
        a, b = factorize(torch.randn(m, n, generator=gen), rank)
        layers[name] = LayerFactors(a, b, (m, n), "linear")
    return KnowledgePacket(layers)


def federation() -> KnowledgeBank:
    """Two resnets, one mobilenet (two layers), one text model, one send-only peer."""
    bank = KnowledgeBank()
    bank.put("r0", packet({"fc": (10, 32)}, 0), group="resnet", round=1)
    bank.put("r1", packet({"fc": (10, 32)}, 1), group="resnet", round=1)
    bank.put("m0", packet({"cls": (10, 40), "conv": (12, 18)}, 2, rank=3), group="mbv2", round=1)
    bank.put("t0", packet({"value": (16, 16)}, 3), group="bert", round=1)
    bank.put("frozen", packet({"fc": (20, 24)}, 4), group="teacher", round=1, send_only=True)
    return bank


def jobs_by_layer(hn: Hypernetwork, bank: KnowledgeBank, targets):
    return {(j.layer, j.clients): j for j in hn.plan(bank, targets)}


def test_plan_batches_groups_and_picks_sources():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL))
    jobs = jobs_by_layer(hn, bank, list(bank))
    assert set(jobs) == {
        ("fc", ("r0", "r1")),  # one batched pass for the whole resnet group
        ("cls", ("m0",)),
        ("conv", ("m0",)),
        ("value", ("t0",)),
    }  # the send-only peer is a source, never a target
    # resnet targets see all four groups (their own has another member): 1+2+1+1 layers
    resnet_job = jobs[("fc", ("r0", "r1"))]
    assert sum(t.shape[0] for _, t in resnet_job.sources.tokens[("B", "rows")]) == 5 * 4
    # the lone mobilenet does not attend to itself: resnet, bert, teacher = 3 layers
    mbv2_job = jobs[("cls", ("m0",))]
    assert sum(t.shape[0] for _, t in mbv2_job.sources.tokens[("B", "rows")]) == 3 * 4
    # rank-3 factors are padded to the adapter's rank 4
    assert mbv2_job.a.shape == (1, 10, 4) and not mbv2_job.a[0, :, 3].any()


def test_plan_without_summaries_and_with_self_transfer():
    bank = federation()
    per_client = Hypernetwork(HypernetConfig(adapter=SMALL, summarize_groups=False))
    jobs = jobs_by_layer(per_client, bank, ["r0", "m0"])
    r0 = jobs[("fc", ("r0",))]  # every other client is a source: r1, m0 (2 layers), t0, frozen
    assert sum(t.shape[0] for _, t in r0.sources.tokens[("B", "rows")]) == 5 * 4
    selfish = Hypernetwork(HypernetConfig(adapter=SMALL, self_transfer=True))
    jobs = jobs_by_layer(selfish, bank, ["m0"])
    cls = jobs[("cls", ("m0",))]  # resnet, bert, teacher + its own conv layer
    widths = [w for w, _ in cls.sources.tokens[("A", "cols")]]
    assert 12 in widths and 10 in widths


def test_lone_client_without_sources_gets_nothing():
    bank = KnowledgeBank()
    bank.put("only", packet({"fc": (10, 32)}, 0), group="g", round=1)
    hn = Hypernetwork(HypernetConfig(adapter=SMALL))
    merged, generation = hn.generate(bank, ["only"], round=2)
    assert merged == {} and generation.jobs == ()


def test_generate_is_identity_at_start_and_one_message_per_client():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL))
    merged, generation = hn.generate(bank, list(bank), round=2)
    assert set(merged) == {"r0", "r1", "m0", "t0"}
    assert set(merged["m0"]) == {"cls", "conv"}
    for cid, layers in merged.items():
        for name, (a, b) in layers.items():
            own = bank.get(cid).packet.layers[name]
            r = own.rank
            assert torch.equal(a[:, :r], own.a) and torch.equal(b[:r], own.b)
    assert generation.targets()["m0"] == {"cls": (10, 4, 40), "conv": (12, 4, 18)}


def test_group_targets_give_a_group_one_target_its_summary():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL, group_targets=True))
    jobs = jobs_by_layer(hn, bank, list(bank))
    fc = next(j for (layer, _), j in jobs.items() if layer == "fc")
    assert fc.members == (("r0", "r1"),) and fc.a.shape[0] == 1  # one row for the group
    # the sources are the same as without group targets: all four groups
    assert sum(t.shape[0] for _, t in fc.sources.tokens[("B", "rows")]) == 5 * 4
    merged, generation = hn.generate(bank, list(bank), round=2)
    mean = bank.summary("resnet", 4).layers["fc"]
    for cid in ("r0", "r1"):  # identity at init: the group's mean transfer layer
        a, b = merged[cid]["fc"]
        assert torch.equal(a, mean.a) and torch.equal(b, mean.b)
    own = bank.get("t0").packet.layers["value"]  # a lone member is its own target
    assert torch.equal(merged["t0"]["value"][0], own.a)
    assert generation.targets()["r1"] == {"fc": (10, 4, 32)}


def test_group_target_of_a_homogeneous_federation_is_its_mean():
    bank = KnowledgeBank()
    for i in range(3):
        bank.put(f"c{i}", packet({"fc": (10, 32)}, i), group="g", round=1)
    hn = Hypernetwork(HypernetConfig(adapter=SMALL, group_targets=True))
    merged, _ = hn.generate(bank, list(bank), round=2)
    mean = bank.summary("g", 4).layers["fc"]
    assert set(merged) == {"c0", "c1", "c2"}
    assert all(torch.equal(merged[c]["fc"][1], mean.b) for c in merged)


def test_group_target_update_sums_the_members_pieces():
    bank = federation()
    cfg = HypernetConfig(
        adapter=SMALL, group_targets=True, max_grad_norm=None, optimizer="sgd", lr=0.1
    )
    torch.manual_seed(0)
    grouped, reference = Hypernetwork(cfg), Hypernetwork(cfg)
    _, gen_grouped = grouped.generate(bank, ["r0", "r1", "t0"], round=2)
    _, gen_ref = reference.generate(bank, ["r0", "r1", "t0"], round=2)
    reference.adapter.load_state_dict(grouped.adapter.state_dict())
    gen = torch.Generator().manual_seed(1)

    def rand_pieces(m, n):
        return (torch.randn(m, 4, generator=gen), torch.randn(4, n, generator=gen))

    p, q, v = rand_pieces(10, 32), rand_pieces(10, 32), rand_pieces(16, 16)
    stats = grouped.update(gen_grouped, {"r0": {"fc": p}, "r1": {"fc": q}, "t0": {"value": v}})
    assert stats["pieces"] == 3
    summed = (p[0] + q[0], p[1] + q[1])
    zeros = (torch.zeros(10, 4), torch.zeros(4, 32))
    reference.update(gen_ref, {"r0": {"fc": summed}, "r1": {"fc": zeros}, "t0": {"value": v}})
    for (name, x), y in zip(
        grouped.adapter.state_dict().items(), reference.adapter.state_dict().values(), strict=True
    ):
        assert torch.allclose(x, y, atol=1e-6), name
    before = {k: t.clone() for k, t in reference.adapter.state_dict().items()}
    assert reference.update(gen_ref, {"r1": {"fc": q}})["pieces"] == 1  # one member replied
    assert any(not torch.equal(before[k], t) for k, t in reference.adapter.state_dict().items())


def random_pieces(merged, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        cid: {
            name: (torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen))
            for name, (a, b) in layers.items()
        }
        for cid, layers in merged.items()
    }


def twin_hypernetworks(**kwargs):
    cfg = HypernetConfig(adapter=SMALL, optimizer="sgd", lr=0.1, max_grad_norm=None, **kwargs)
    one, two = Hypernetwork(cfg), Hypernetwork(cfg)
    for hn in (one, two):  # away from the identity, so every parameter has a gradient
        hn.register_shapes([(10, 32), (10, 40), (12, 18), (16, 16), (20, 24)])
        with torch.no_grad():
            for i, p in enumerate(hn.adapter.parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.3)
    return one, two


def assert_same_adapter(one, two):
    for (name, x), y in zip(
        one.adapter.state_dict().items(), two.adapter.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)


@contextmanager
def counting_passes(hn):
    """A list that gets an entry for every adapter forward pass run inside the block."""
    passes = []
    handle = hn.adapter.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        yield passes
    finally:
        handle.remove()


@pytest.mark.parametrize("group_targets", [False, True])
def test_update_from_the_graph_kept_by_generate_equals_a_recomputed_pass(group_targets):
    """Rows whose clients did not reply (r1, m0) add nothing, kept graph or not."""
    bank = federation()
    kept, recomputed = twin_hypernetworks(group_targets=group_targets)
    targets = ["r0", "r1", "m0", "t0"]
    merged, gen_kept = kept.generate(bank, targets, round=2)
    _, gen_recomputed = recomputed.generate(bank, targets, round=2)
    assert len(gen_kept.outputs) == len(gen_kept.jobs)  # every job fits in one chunk
    gen_recomputed.outputs.clear()  # as for jobs beyond chunk_size rows
    pieces = random_pieces(merged, seed=5)
    pieces = {c: pieces[c] for c in ("r0", "t0")}
    gen_kept.measure()  # the diagnostics' own pass, taken while the clients train
    gen_recomputed.measure()
    with counting_passes(kept) as kept_passes, counting_passes(recomputed) as new_passes:
        stats = kept.update(gen_kept, pieces)
        reference = recomputed.update(gen_recomputed, pieces)
    assert kept_passes == [] and new_passes  # the kept graph spares the update a forward pass
    assert stats["pieces"] == reference["pieces"] == 2
    assert stats["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert_same_adapter(kept, recomputed)
    assert not gen_kept.outputs  # a graph is used once


def test_a_graph_kept_from_before_the_adapter_changed_is_not_used():
    bank = federation()
    stale, fresh = twin_hypernetworks()
    merged, first = stale.generate(bank, ["r0", "t0"], round=2)
    _, second = stale.generate(bank, ["r0", "t0"], round=3)
    stale.update(second, random_pieces(merged, seed=1))  # a step between generate and update
    _, mirror = fresh.generate(bank, ["r0", "t0"], round=3)
    fresh.update(mirror, random_pieces(merged, seed=1))
    _, first_again = fresh.generate(bank, ["r0", "t0"], round=2)
    first_again.outputs.clear()
    # the first generation's graph holds the parameters from before the step
    with counting_passes(stale) as passes:
        stale.update(first, random_pieces(merged, seed=2))
    assert passes  # recomputed at the current parameters
    fresh.update(first_again, random_pieces(merged, seed=2))
    assert_same_adapter(stale, fresh)


def test_generate_keeps_the_graph_only_of_a_round_that_fits_in_one_chunk():
    """And leaves the diagnostics for later only then: a larger round measures as it goes,
    holding no chunk's attention heads beyond its own."""
    bank = federation()
    targets = ["r0", "r1", "m0", "t0"]  # 5 rows: r0, r1, m0 twice (two layers), t0
    small = Hypernetwork(HypernetConfig(adapter=SMALL, chunk_size=5))
    merged, generation = small.generate(bank, targets, round=2)
    assert sorted(generation.outputs) == list(range(len(generation.jobs)))
    assert all(out.requires_grad for pair in generation.outputs.values() for out in pair)
    assert not any(
        t.requires_grad for layers in merged.values() for pair in layers.values() for t in pair
    )  # what is sent carries no graph
    assert generation.pending and not generation.measured
    large = Hypernetwork(HypernetConfig(adapter=SMALL, chunk_size=4))
    _, big = large.generate(bank, targets, round=2)
    assert not big.outputs  # recomputed chunk by chunk
    assert not big.pending and big.diagnostics.keys() == generation.diagnostics.keys()
    for cid, layers in big.diagnostics.items():
        for layer, stats in layers.items():
            assert stats["transfer_effect"] == 0.0  # the same untrained adapter
            assert stats["attention"] == pytest.approx(
                generation.diagnostics[cid][layer]["attention"]
            )


def steps_towards(hn, bank, goals, steps):
    """Run ``steps`` rounds where each client 'trains' its layer to ``goals[cid]``."""
    errors = []
    for rnd in range(steps):
        merged, generation = hn.generate(bank, list(goals), round=rnd)
        pieces, err = {}, 0.0
        for cid, layers in merged.items():
            pieces[cid] = {}
            for name, (a, b) in layers.items():
                delta = a @ b - goals[cid][name]  # Δ = W_new − W_trained
                err += float(delta.pow(2).sum())
                pieces[cid][name] = (delta @ b.T, a.T @ delta)
        errors.append(err)
        hn.update(generation, pieces)
    return errors


def test_update_moves_generated_weights_towards_what_clients_learned():
    bank = federation()
    gen = torch.Generator().manual_seed(9)
    goals = {}
    for cid in ["r0", "r1", "t0"]:
        goals[cid] = {}
        for name, lf in bank.get(cid).packet.layers.items():
            m, n = lf.matrix_shape
            goals[cid][name] = lf.a @ lf.b + 0.3 * torch.randn(m, n, generator=gen)
    cfg = HypernetConfig(adapter=SMALL, lr=3e-3, max_grad_norm=None)
    errors = steps_towards(Hypernetwork(cfg), bank, goals, steps=15)
    assert errors[-1] < 0.9 * errors[0]


def test_update_only_sums_clients_that_replied_and_clips():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL, max_grad_norm=0.5))
    merged, generation = hn.generate(bank, list(bank), round=2)
    pieces = {"r0": {"fc": tuple(torch.ones_like(t) for t in merged["r0"]["fc"])}}
    stats = hn.update(generation, pieces)
    assert stats["pieces"] == 1 and stats["grad_norm"] > 0.5
    assert hn.update(generation, {}) == {"pieces": 0, "grad_norm": 0.0}


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        ({"t0": {}}, r"'t0': gradient pieces for layers \[\], expected \['value'\]"),
        ({"t0": {"value": (torch.zeros(16, 3), torch.zeros(3, 16))}}, r"expected \(16, 4\)"),
        ({"t0": {"value": (torch.full((16, 4), float("nan")), torch.zeros(4, 16))}}, "non-finite"),
        ({"frozen": {"fc": (torch.zeros(20, 4), torch.zeros(4, 24))}}, "got no factors"),
    ],
)
def test_update_rejects_bad_pieces_without_changing_state(pieces, message):
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL))
    _, generation = hn.generate(bank, list(bank), round=2)
    before = {k: v.clone() for k, v in hn.adapter.state_dict().items()}
    with pytest.raises(PacketError, match=message):
        hn.update(generation, pieces)
    after = hn.adapter.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_round_trip_is_exact():
    bank = federation()
    goals = {
        cid: {n: lf.a @ lf.b * 1.1 for n, lf in bank.get(cid).packet.layers.items()}
        for cid in ["r0", "r1", "m0", "t0"]
    }
    cfg = HypernetConfig(adapter=SMALL)
    hn = Hypernetwork(cfg)
    steps_towards(hn, bank, goals, steps=2)
    state = {"hypernet": hn.state_dict(), "bank": bank.state_dict()}

    hn2, bank2 = Hypernetwork(cfg), KnowledgeBank()
    hn2.load_state_dict(state["hypernet"])
    bank2.load_state_dict(state["bank"])
    assert bank2.state_dict().keys() == bank.state_dict().keys()
    assert bank2.get("m0").packet.signature() == bank.get("m0").packet.signature()
    # continuing both gives bit-identical adapters (Adam moments were restored too)
    steps_towards(hn, bank, goals, steps=1)
    steps_towards(hn2, bank2, goals, steps=1)
    s1, s2 = hn.adapter.state_dict(), hn2.adapter.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    with pytest.raises(RuntimeError, match="fresh"):
        hn.load_state_dict(state["hypernet"])


def test_bank_checks_groups_forgets_and_summarises():
    bank = federation()
    with pytest.raises(PacketError, match="differ from those of group 'resnet'"):
        bank.put("r2", packet({"fc": (10, 33)}, 5), group="resnet", round=2)
    assert "r2" not in bank
    r0, r1 = bank.get("r0").packet.layers["fc"], bank.get("r1").packet.layers["fc"]
    mean = (r0.a @ r0.b + r1.a @ r1.b) / 2
    fa, fb = factorize(mean, 4)
    summary = bank.summary("resnet", 4).layers["fc"]
    torch.testing.assert_close(summary.a @ summary.b, fa @ fb)
    bank.put("r0", packet({"fc": (10, 32)}, 7), group="resnet", round=5)
    assert bank.forget_older_than(current_round=5, max_age=2) == ["r1", "m0", "t0", "frozen"]
    assert list(bank) == ["r0"]


def test_hypernet_config_errors():
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        HypernetConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be >= 0"):
        HypernetConfig(lr=-1e-3)
    with pytest.raises(ValueError, match="chunk_size"):
        HypernetConfig(chunk_size=0)
    with pytest.raises(ValueError, match="update_rows must be >= 1 or None"):
        HypernetConfig(update_rows=0)


def test_transfer_effect_is_zero_untrained_and_grows_as_the_adapter_learns():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL, lr=1e-2, max_grad_norm=None))
    _, generation = hn.generate(bank, list(bank), round=2)
    diag = generation.diagnostics
    assert set(diag) == {"r0", "r1", "m0", "t0"}  # every target, none for the send-only peer
    assert all(d["transfer_effect"] == 0.0 for t in diag.values() for d in t.values())
    # attention over source groups: a distribution, over the groups that are sources
    resnet = diag["r0"]["fc"]["attention"]
    assert set(resnet) == {"resnet", "mbv2", "bert", "teacher"}
    assert sum(resnet.values()) == pytest.approx(1.0)
    assert "mbv2" not in diag["m0"]["cls"]["attention"]  # a lone member is no source of itself
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        merged, generation = hn.generate(bank, list(bank), round=2)
        pieces = {
            c: {n: tuple(torch.randn(t.shape, generator=gen) for t in f) for n, f in ls.items()}
            for c, ls in merged.items()
        }
        stats = hn.update(generation, pieces)
        assert stats["step_norm"] > 0
    _, generation = hn.generate(bank, list(bank), round=3)
    effects = [d["transfer_effect"] for t in generation.diagnostics.values() for d in t.values()]
    assert min(effects) > 0
    lam = hn.adapter.mixtures()
    assert len(lam) == 1 and all(sum(f) == pytest.approx(1.0) for f in lam[0])


@pytest.mark.parametrize("m,n", [(10, 32), (300, 400)])  # a formed product, and QR cores
def test_the_transfer_effects_norm_comes_from_the_factors(m, n):
    """‖A'B' − A_r B_r‖ as product_norm([A', A' − A_r], [B' − B_r; B_r]): the float64 value,
    and exactly 0 when the two passes agree."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, m, 4, generator=gen), torch.randn(3, 4, n, generator=gen)
    ref_a = a + 1e-3 * torch.randn(a.shape, generator=gen)
    ref_b = b + 1e-3 * torch.randn(b.shape, generator=gen)
    exact = torch.linalg.matrix_norm(a.double() @ b.double() - ref_a.double() @ ref_b.double())
    moved = product_norm(torch.cat([a, a - ref_a], -1), torch.cat([b - ref_b, ref_b], -2))
    torch.testing.assert_close(moved.double(), exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(product_norm(a, b), torch.linalg.matrix_norm(a @ b))
    same = product_norm(torch.cat([a, a - a], -1), torch.cat([b - b, b], -2))
    assert torch.equal(same, torch.zeros(3))


def test_a_batch_of_targets_gives_each_what_it_gets_alone():
    """Rows batched into one pass (chunk_size 8: every job's rows, graph kept, measured later)
    or in chunks of two (each job's first chunk measured as it goes) get the merged factors,
    diagnostics and update that each row gets in a pass of its own; the rows differ, so a
    mix-up would show."""
    bank = federation()
    bank.put("r2", packet({"fc": (10, 32)}, 5), group="resnet", round=1)
    bank.put("m1", packet({"cls": (10, 40), "conv": (12, 18)}, 6, rank=3), group="mbv2", round=1)
    targets = ["r0", "r1", "r2", "m0", "m1", "t0"]  # rows: fc 3, cls 2, conv 2, value 1
    results = {}
    for chunk_size in (1, 2, 8):
        hn, _ = twin_hypernetworks(chunk_size=chunk_size)
        merged, generation = hn.generate(bank, targets, round=2)
        assert bool(generation.outputs) == (chunk_size == 8)
        diagnostics = generation.diagnostics
        hn.update(generation, random_pieces(merged, seed=4))
        results[chunk_size] = (hn, merged, diagnostics)
    alone, merged_alone, _ = results[1]
    diag_all = results[8][2]  # one chunk: every row measured
    effects = [diag_all[c]["fc"]["transfer_effect"] for c in ("r0", "r1", "r2")]
    assert min(effects) > 0 and len({round(e, 6) for e in effects}) == 3
    assert diag_all["r0"]["fc"]["attention"] != pytest.approx(diag_all["r1"]["fc"]["attention"])
    for chunk_size in (2, 8):
        hn, merged, _ = results[chunk_size]
        for cid, layers in merged_alone.items():
            for layer, (a, b) in layers.items():
                torch.testing.assert_close(merged[cid][layer], (a, b), atol=1e-6, rtol=1e-5)
        assert_same_adapter(hn, alone)
    # in chunks, each job's first chunk is measured, and as a pass of the whole round measures
    assert {c: set(ls) for c, ls in results[2][2].items()} == {
        "r0": {"fc"},
        "r1": {"fc"},
        "m0": {"cls", "conv"},
        "m1": {"cls", "conv"},
        "t0": {"value"},
    }
    assert {c: set(ls) for c, ls in results[1][2].items()} == {
        "r0": {"fc"},
        "m0": {"cls", "conv"},
        "t0": {"value"},
    }
    for chunk_size in (1, 2):
        for cid, layers in results[chunk_size][2].items():
            for layer, stats in layers.items():
                ref = diag_all[cid][layer]
                assert stats["transfer_effect"] == pytest.approx(ref["transfer_effect"], rel=1e-4)
                assert stats["attention"] == pytest.approx(ref["attention"], rel=1e-5)


def test_diagnostics_measure_the_adapter_that_generated_even_when_asked_after_the_update():
    """Measured while the clients train, or by the update before its step: the same."""
    bank = federation()
    early, late = twin_hypernetworks()
    merged, first = early.generate(bank, list(bank), round=2)
    _, second = late.generate(bank, list(bank), round=2)
    first.measure()
    assert first.pending == [] and second.pending  # nothing measured yet in the second
    pieces = random_pieces(merged, seed=3)
    early.update(first, pieces)
    late.update(second, pieces)  # measures first
    assert second.pending == [] and second.diagnostics == first.diagnostics
    assert any(d["transfer_effect"] > 0 for t in first.diagnostics.values() for d in t.values())


def test_a_gradient_that_overflows_skips_the_step_and_changes_nothing():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL))
    merged, generation = hn.generate(bank, ["t0"], round=2)
    before = {k: v.clone() for k, v in hn.adapter.state_dict().items()}
    huge = {"t0": {"value": tuple(torch.full_like(t, 3e38) for t in merged["t0"]["value"])}}
    stats = hn.update(generation, huge)  # finite pieces, but their gradient is not
    assert stats["skipped"] == 1.0 and hn.steps == 0
    assert all(torch.equal(before[k], v) for k, v in hn.adapter.state_dict().items())
    assert all(p.grad is None for p in hn.adapter.parameters())


def _source_products(job) -> list[torch.Tensor]:
    return [a @ b for a, b in job.source_factors]


def test_random_sources_hide_every_clients_weights_and_stay_fixed_across_rounds():
    bank = federation()
    real = Hypernetwork(HypernetConfig(adapter=SMALL, summarize_groups=False))
    control = Hypernetwork(HypernetConfig(adapter=SMALL, summarize_groups=False, source="random"))
    for real_job, random_job in zip(
        real.plan(bank, list(bank)), control.plan(bank, list(bank)), strict=True
    ):
        assert random_job.source_groups == real_job.source_groups
        for seen, stand_in in zip(
            _source_products(real_job), _source_products(random_job), strict=True
        ):
            assert seen.shape == stand_in.shape and not torch.allclose(seen, stand_in)
            # of the real source's norm (its product's)
            assert torch.allclose(stand_in.norm(), seen.norm(), rtol=1e-4)
        assert torch.equal(random_job.a, real_job.a)  # the target's own factors are real
    every_weight = [lf.a @ lf.b for c in bank for lf in bank.get(c).packet.layers.values()]
    first = {j.layer: _source_products(j) for j in control.plan(bank, ["r0"])}
    # a later round: new packets from everybody; the stand-ins do not move
    for cid in list(bank):
        entry = bank.get(cid)
        shapes = {n: lf.matrix_shape for n, lf in entry.packet.layers.items()}
        rank = max(lf.rank for lf in entry.packet.layers.values())
        new = packet(shapes, 100 + len(cid), rank)
        bank.put(cid, new, group=entry.group, round=2, send_only=entry.send_only)
    later = {j.layer: _source_products(j) for j in control.plan(bank, ["r0"])}
    assert all(
        torch.equal(x, y)
        for layer in first
        for x, y in zip(first[layer], later[layer], strict=True)
    )
    seen_by_adapter = [p for ps in later.values() for p in ps]
    assert not any(
        p.shape == w.shape and torch.allclose(p, w) for p in seen_by_adapter for w in every_weight
    )
    restored = Hypernetwork(control.cfg)
    restored.load_state_dict(control.state_dict())  # a resumed run keeps its stand-ins
    again = {j.layer: _source_products(j) for j in restored.plan(bank, ["r0"])}
    assert all(torch.equal(x, y) for x, y in zip(again["fc"], later["fc"], strict=True))


def test_without_sources_a_target_attends_to_its_own_factors_only():
    bank = federation()
    hn = Hypernetwork(HypernetConfig(adapter=SMALL, source="none"))
    jobs = hn.plan(bank, list(bank))
    assert sorted((j.layer, j.clients) for j in jobs) == [
        ("cls", ("m0",)),
        ("conv", ("m0",)),
        ("fc", ("r0",)),  # each its own: no shared source set to batch them by
        ("fc", ("r1",)),
        ("value", ("t0",)),
    ]
    for job in jobs:
        (pair,) = job.source_factors
        assert job.source_groups == (job.group,)
        assert torch.equal(pair[0], job.a[0]) and torch.equal(pair[1], job.b[0])
    merged, _ = hn.generate(bank, ["t0"], round=2)
    own = bank.get("t0").packet.layers["value"]
    assert torch.equal(merged["t0"]["value"][0][:, : own.rank], own.a)  # identity at start
    with pytest.raises(ValueError, match="source='mine'"):
        HypernetConfig(source="mine")


def test_a_round_larger_than_a_chunk_measures_a_sample_of_each_job():
    bank = KnowledgeBank()
    for i in range(7):  # one job: seven targets of one group, one layer, one source set
        bank.put(f"c{i}", packet({"fc": (10, 32)}, i), group="g", round=1)
    bank.put("other", packet({"w": (12, 20)}, 9), group="h", round=1)
    targets = [f"c{i}" for i in range(7)]
    whole = Hypernetwork(HypernetConfig(adapter=SMALL, chunk_size=8))
    sampled = Hypernetwork(HypernetConfig(adapter=SMALL, chunk_size=3, diagnostic_rows=2))
    steps_towards(whole, bank, {c: {"fc": torch.ones(10, 32)} for c in targets}, steps=1)
    sampled.load_state_dict(whole.state_dict())
    _, all_rows = whole.generate(bank, targets, round=2)
    _, first_chunks = sampled.generate(bank, targets, round=2)
    full, sample = all_rows.diagnostics, first_chunks.diagnostics
    assert len(full) == 7 and sorted(sample) == targets[:2]  # each job's first targets
    for cid in sample:
        assert sample[cid]["fc"]["transfer_effect"] == pytest.approx(
            full[cid]["fc"]["transfer_effect"], rel=1e-4
        )
        assert sample[cid]["fc"]["attention"] == pytest.approx(full[cid]["fc"]["attention"])


def crowd(n: int, same: bool = False) -> KnowledgeBank:
    """``n`` clients of one group with a ``(10, 32)`` layer: all the same factors when
    ``same``."""
    bank = KnowledgeBank()
    for i in range(n):
        bank.put(f"c{i}", packet({"fc": (10, 32)}, 0 if same else i), group="resnet", round=1)
    return bank


def moved_by_update(bank, pieces, round=2, **kwargs):
    """The adapter's parameters' change from one SGD step (no clipping: linear in the
    gradient) on ``pieces``, and the target factors each recomputed pass held."""
    hn = twin_hypernetworks(**kwargs)[0]
    before = [p.detach().clone() for p in hn.adapter.parameters()]
    _, generation = hn.generate(bank, list(bank), round=round)
    generation.measure()  # the diagnostics' own pass, before the update
    held = []
    hook = hn.adapter.register_forward_pre_hook(lambda module, args: held.append(args[0]))
    stats = hn.update(generation, pieces)
    hook.remove()
    after = list(hn.adapter.parameters())
    return [a.detach() - b for a, b in zip(after, before, strict=True)], held, stats, generation


@pytest.mark.parametrize("chunk_size", [2, 64])  # recomputed passes; the generating graph
def test_a_round_with_more_targets_than_update_rows_steps_on_a_scaled_sample(chunk_size):
    """Equal rows: 3 of 8, scaled by 8/3, are the full sum, and only they are recomputed."""
    bank = crowd(8, same=True)
    one = {"fc": (torch.ones(10, 4) * 0.1, torch.ones(4, 32) * 0.1)}
    pieces = {cid: one for cid in bank}
    full, _, stats_full, _ = moved_by_update(bank, pieces, update_rows=None, chunk_size=chunk_size)
    part, held, stats, _ = moved_by_update(bank, pieces, update_rows=3, chunk_size=chunk_size)
    assert stats_full["pieces"] == 8 and stats["pieces"] == 3
    # the other rows are not recomputed (none is, where the generating pass kept its graph)
    assert sum(a.shape[0] for a in held) == (3 if chunk_size < 8 else 0)
    for x, y in zip(part, full, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_the_sample_is_distinct_rows_drawn_by_round_and_its_step_is_theirs_scaled():
    bank = crowd(8)
    gen = torch.Generator().manual_seed(3)
    pieces = {
        cid: {"fc": (torch.randn(10, 4, generator=gen), torch.randn(4, 32, generator=gen))}
        for cid in bank
    }
    samples = {}
    for rnd in (2, 3):
        part, held, _, generation = moved_by_update(bank, pieces, rnd, update_rows=3, chunk_size=2)
        (job,) = generation.jobs
        rows = [next(i for i, a in enumerate(job.a) if torch.equal(a, x)) for t in held for x in t]
        assert len(set(rows)) == 3
        samples[rnd] = [job.members[i][0] for i in rows]
        # the same step as an exact update from the sampled clients alone, times 8/3
        mine = {cid: pieces[cid] for cid in samples[rnd]}
        alone, *_ = moved_by_update(bank, mine, rnd, update_rows=None, chunk_size=2)
        for x, y in zip(part, alone, strict=True):
            torch.testing.assert_close(x, y * 8 / 3, atol=1e-6, rtol=1e-4)
        again, *_ = moved_by_update(bank, pieces, rnd, update_rows=3, chunk_size=2)
        assert all(torch.equal(x, y) for x, y in zip(part, again, strict=True))  # seeded
    assert set(samples[2]) != set(samples[3])  # a new sample each round
