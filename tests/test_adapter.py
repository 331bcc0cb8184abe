import math

import pytest
import torch
import torch.nn.functional as F

from mergenet_fl import LPKA, VARIANTS, AdapterConfig, SourceTokens, factorize, pad_rank
from mergenet_fl.adapter import Branch, Capture, KeyMemo, compress_tokens

SHAPES = [(10, 48), (24, 36), (16, 16)]


def sources_for(shapes, rank=4, max_tokens=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    factors = [
        pad_rank(*factorize(torch.randn(m, n, generator=gen), rank - 1), rank) for m, n in shapes
    ]
    return factors, SourceTokens.build(factors, rank, max_tokens)


def batch(shape, n=3, rank=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pairs = [factorize(torch.randn(*shape, generator=gen), rank) for _ in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def perturbed(cfg, shapes, seed=0):
    adapter = LPKA(cfg)
    adapter.register_shapes(shapes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return adapter


IDENTITY_VARIANTS = [v for v in VARIANTS if AdapterConfig(variant=v).identity_at_start]


@pytest.mark.parametrize("variant", IDENTITY_VARIANTS)
def test_identity_at_initialisation(variant):
    cfg = AdapterConfig(variant=variant, rank=4, dim=8, heads=2, layers=2, max_source_tokens=8)
    adapter = LPKA(cfg)
    adapter.register_shapes(SHAPES)
    _, sources = sources_for(SHAPES)
    for shape in SHAPES:
        a, b = batch(shape)
        out_a, out_b = adapter(a, b, sources)
        assert torch.equal(out_a, a) and torch.equal(out_b, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_adapter_changes_factors_and_keeps_shapes(variant):
    cfg = AdapterConfig(variant=variant, rank=4, dim=8, heads=2, layers=2)
    adapter = perturbed(cfg, SHAPES)
    _, sources = sources_for(SHAPES)
    a, b = batch((24, 36))
    out_a, out_b = adapter(a, b, sources)
    assert out_a.shape == a.shape and out_b.shape == b.shape
    assert not torch.allclose(out_a, a)


@pytest.mark.parametrize("variant", ["lpka", "paper"])
def test_passes_sharing_a_key_memo_project_the_keys_once_and_change_nothing(variant):
    """Targets of two shapes over one source set: with a shared memo each branch projects the
    keys once, the outputs are the same, and one backward over both passes gives the
    gradient of two passes without it."""
    cfg = AdapterConfig(variant=variant, rank=4, dim=8, heads=2, layers=2)
    adapter = perturbed(cfg, SHAPES)
    _, sources = sources_for(SHAPES)
    targets = [batch((10, 48)), batch((24, 36), n=2)]
    grads = [(torch.randn_like(a), torch.randn_like(b)) for a, b in targets]
    calls = []
    for branch in adapter.modules():
        if isinstance(branch, Branch):
            branch.k.register_forward_hook(lambda *_: calls.append(1))

    def run(memo_for):
        adapter.zero_grad(set_to_none=True)
        calls.clear()
        outs = [adapter(a, b, sources, memo_for()) for a, b in targets]
        torch.autograd.backward(
            [t for out in outs for t in out], [g for pair in grads for g in pair]
        )
        return outs, [p.grad for p in adapter.parameters()], len(calls)

    memo = KeyMemo()
    shared_outs, shared_grads, shared_calls = run(lambda: memo)
    own_outs, own_grads, own_calls = run(lambda: None)
    branches = 2 * len(cfg.combos) * cfg.layers
    assert len(memo.heads) == branches
    assert own_calls == 2 * shared_calls and shared_calls >= branches
    for (sa, sb), (oa, ob) in zip(shared_outs, own_outs, strict=True):
        assert torch.equal(sa, oa) and torch.equal(sb, ob)
    assert [g is None for g in shared_grads] == [g is None for g in own_grads]
    for sg, og in zip(shared_grads, own_grads, strict=True):
        if sg is not None:
            torch.testing.assert_close(sg, og, rtol=1e-4, atol=1e-6)  # summation order


@pytest.mark.parametrize("variant", ["paper", "paper_mlp"])
def test_the_papers_variants_overwrite_from_the_start(variant):
    cfg = AdapterConfig(variant=variant, rank=4, dim=8, heads=2, layers=2, max_source_tokens=8)
    adapter = LPKA(cfg)
    adapter.register_shapes(SHAPES)
    _, sources = sources_for(SHAPES)
    a, b = batch((24, 36))
    out_a, out_b = adapter(a, b, sources)
    assert not torch.allclose(out_a @ out_b, a @ b, atol=1e-2)  # no identity at start
    if variant == "paper_mlp":  # generated from the sources alone: the target does not matter
        other_a, other_b = adapter(a * 3 + 1, b - 2, sources)
        assert torch.equal(other_a, out_a) and torch.equal(other_b, out_b)
    else:  # post-norm: the tokens of the shared readings come out normalised (unit affine)
        rows = out_a.reshape(-1, 4)
        assert torch.allclose(rows.mean(-1), torch.zeros(rows.shape[0]), atol=1e-4)


def test_source_norm_off_lets_the_sources_scale_matter():
    shapes = [(24, 36)]
    outs = []
    for norm in (True, False):
        cfg = AdapterConfig(rank=4, dim=8, heads=2, layers=1, source_norm=norm)
        adapter = perturbed(cfg, shapes + SHAPES)
        factors, _ = sources_for(SHAPES)
        a, b = batch(shapes[0])
        pair = []
        for scale in (1.0, 100.0):
            scaled = [(fa * scale, fb * scale) for fa, fb in factors]
            pair.append(adapter(a, b, SourceTokens.build(scaled, 4, 8))[0])
        outs.append(float((pair[0] - pair[1]).norm() / (pair[0] - a).norm()))
    assert outs[0] < 0.05 and outs[1] > 0.5  # normalised keys are nearly blind to scale


def test_mlp_update_ignores_the_target():
    cfg = AdapterConfig(variant="mlp", rank=4, dim=8, heads=2, layers=1)
    adapter = perturbed(cfg, SHAPES)
    _, sources = sources_for(SHAPES)
    a, b = batch((10, 48))
    out_a, out_b = adapter(a, b, sources)
    delta = out_a - a
    torch.testing.assert_close(delta[0], delta[1])  # same update for different targets
    lpka = perturbed(AdapterConfig(rank=4, dim=8, heads=2, layers=1), SHAPES)
    out_a, _ = lpka(a, b, sources)
    assert not torch.allclose((out_a - a)[0], (out_a - a)[1])


def test_variants_use_their_combinations_and_mixing():
    assert AdapterConfig(variant="rows").combos == (("rows", "rows"),)
    assert len(AdapterConfig(variant="avg").combos) == 4
    lpka, avg = LPKA(AdapterConfig(variant="lpka")), LPKA(AdapterConfig(variant="avg"))
    assert isinstance(lpka.body[0].mix_logits, torch.nn.Parameter)
    assert not isinstance(avg.body[0].mix_logits, torch.nn.Parameter)
    assert "mix_logits" in dict(avg.body[0].named_buffers())


def test_shared_readings_share_weights_across_layers():
    adapter = LPKA(AdapterConfig(rank=4, dim=8, heads=2, layers=1))
    adapter.register_shapes([(10, 48)])
    branch = adapter.body[0].branches["A_rows_rows"]
    assert sorted(branch.q.by_width) == ["4"]  # rows of A: width R whatever the layer
    new = adapter.register_shapes([(24, 36)])
    assert sorted(branch.q.by_width) == ["4"]
    assert sorted(adapter.body[0].branches["A_cols_rows"].q.by_width) == ["10", "24"]
    assert new and adapter.register_shapes([(24, 36)]) == []


def test_projection_init_does_not_depend_on_registration_order():
    one = LPKA(AdapterConfig(rank=4, dim=8, heads=2))
    two = LPKA(AdapterConfig(rank=4, dim=8, heads=2))
    one.register_shapes([(10, 48), (24, 36)])
    two.register_shapes([(24, 36), (10, 48)])
    s1, s2 = one.state_dict(), two.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_hand_computed_gradient_on_a_tiny_case():
    """``avg`` variant, one KTL, one source layer: the output projection's gradient by hand."""
    r, dim, heads = 2, 4, 2
    cfg = AdapterConfig(
        variant="avg", rank=r, dim=dim, heads=heads, layers=1, max_source_tokens=None
    )
    adapter = LPKA(cfg)
    adapter.register_shapes([(3, 5), (4, 6)])
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, r, generator=gen), torch.randn(1, r, 5, generator=gen)
    src_a, src_b = torch.randn(4, r, generator=gen), torch.randn(r, 6, generator=gen)
    sources = SourceTokens.build([(src_a, src_b)], r, None)
    g_a, g_b = torch.randn(1, 3, r, generator=gen), torch.randn(1, r, 5, generator=gen)

    out = adapter(a, b, sources)
    names = dict(adapter.named_parameters())
    params = [
        "body.0.branches.A_rows_rows.o.by_width.2.weight",
        "body.0.branches.A_rows_rows.o.by_width.2.bias",
        "body.0.branches.A_cols_rows.o.by_width.3.bias",
        "body.0.branches.B_cols_cols.o.by_width.2.bias",
    ]
    grads = torch.autograd.grad(out, [names[p] for p in params], grad_outputs=(g_a, g_b))

    # At initialisation every branch's output projection and the FFN's last layer are zero,
    # so A' = A + 1/4 Σ_k (o_k(attn_k) read back), and dA'/d(bias_k) is the plain sum.
    lam = 0.25
    torch.testing.assert_close(grads[1], lam * g_a[0].sum(0))  # bias added to each row of A
    torch.testing.assert_close(grads[2], lam * g_a[0].sum(1))  # bias added to each column of A
    torch.testing.assert_close(grads[3], lam * g_b[0].sum(1))  # bias added to each column of B

    # The weight: o(x) = x Wᵀ + b, so dL/dW = λ Σ_tokens g_token ⊗ attn_token, with the
    # attention computed here by hand: softmax(q kᵀ / √d_h) v per head.
    br = adapter.body[0].branches["A_rows_rows"]
    q = F.layer_norm(a[0], (r,)) @ br.q.by_width["2"].weight.T + br.q.by_width["2"].bias
    ks = F.layer_norm(src_a, (r,))
    k = ks @ br.k.by_width["2"].weight.T + br.k.by_width["2"].bias
    v = ks @ br.v.by_width["2"].weight.T + br.v.by_width["2"].bias
    dh = dim // heads
    attn = torch.cat(
        [
            torch.softmax(
                q[:, h * dh : (h + 1) * dh] @ k[:, h * dh : (h + 1) * dh].T / math.sqrt(dh), -1
            )
            @ v[:, h * dh : (h + 1) * dh]
            for h in range(heads)
        ],
        dim=1,
    )
    torch.testing.assert_close(grads[0], lam * g_a[0].T @ attn)


@pytest.mark.parametrize("heads", [2, 4])  # head width 4 (the fused kernel) and 2 (< 3 columns)
def test_attention_shares_sum_the_softmax_over_each_columns_tokens(heads):
    """Per target: the softmax weights of every branch, averaged over heads and query tokens,
    summed over the tokens of each column's sources, weighted by λ, averaged over the KTLs."""
    cfg = AdapterConfig(rank=4, dim=8, heads=heads, layers=2)
    adapter = perturbed(cfg, SHAPES)
    _, sources = sources_for(SHAPES)
    a, b = batch((24, 36))
    with adapter.capturing() as captured:
        adapter(a, b, sources)
    expected = torch.zeros(a.shape[0], len(SHAPES))
    for ktl in adapter.body:
        lam = ktl.mixture() / 2
        for fi, f in enumerate(("A", "B")):
            for ci, (qr, kr) in enumerate(cfg.combos):
                q, k, n, lq = captured[f"{ktl.path}.{f}_{qr}_{kr}"]
                weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                per_token = weights.mean(1).reshape(n, lq, -1).mean(1)  # (N, L)
                owners = torch.cat(sources.owners[(f, kr)])
                shares = torch.zeros(n, len(SHAPES)).index_add_(1, owners, per_token)
                expected += lam[fi, ci].detach() * shares / len(adapter.body)
    each = adapter.attention_shares(captured, sources, torch.arange(len(SHAPES)))
    torch.testing.assert_close(each, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(each.sum(1), torch.ones(a.shape[0]))
    paired = adapter.attention_shares(captured, sources, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(paired, torch.stack([each[:, 1], each[:, 0] + each[:, 2]], 1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_low_rank_pieces_give_the_full_delta_gradient(variant):
    cfg = AdapterConfig(variant=variant, rank=4, dim=8, heads=2, layers=2)
    adapter = perturbed(cfg, SHAPES)
    _, sources = sources_for(SHAPES)
    a, b = batch((24, 36))
    delta = torch.randn(3, 24, 36, generator=torch.Generator().manual_seed(5))
    params = [p for p in adapter.parameters()]

    out_a, out_b = adapter(a, b, sources)
    full = torch.autograd.grad(out_a @ out_b, params, grad_outputs=delta, allow_unused=True)
    out_a, out_b = adapter(a, b, sources)
    g_a, g_b = delta @ out_b.detach().transpose(1, 2), out_a.detach().transpose(1, 2) @ delta
    low = torch.autograd.grad((out_a, out_b), params, grad_outputs=(g_a, g_b), allow_unused=True)
    used = 0
    for f, lo in zip(full, low, strict=True):
        assert (f is None) == (lo is None)
        if f is not None:
            torch.testing.assert_close(f, lo, atol=1e-5, rtol=1e-4)
            used += 1
    assert used > 4


def test_compress_tokens():
    tokens = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    assert compress_tokens(tokens, None) is tokens
    assert compress_tokens(tokens, 200) is tokens
    small = compress_tokens(tokens, 10)
    assert small.shape == (10, 4)
    assert torch.equal(small, compress_tokens(tokens.clone(), 10))
    # bins of tokens sorted by the first coordinate: first coordinates come out increasing
    assert (small[1:, 0] >= small[:-1, 0]).all()
    torch.testing.assert_close(small.mean(0), tokens.mean(0))


def test_source_tokens_group_by_width_and_compress():
    factors, tokens = sources_for([(10, 48), (24, 36), (10, 20)], max_tokens=8)
    a_cols = tokens.tokens[("A", "cols")]
    assert [(w, t.shape) for w, t in a_cols] == [(10, (8, 10)), (24, (4, 24))]
    a_rows = tokens.tokens[("A", "rows")]
    assert [(w, t.shape[0]) for w, t in a_rows] == [(4, 8 + 8 + 8)]
    with pytest.raises(ValueError, match="at least one source"):
        SourceTokens.build([], 4, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "attn"}, "variant='attn'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"dim": 10, "heads": 4}, "dim=10 is not divisible by heads=4"),
        ({"max_source_tokens": 0}, "max_source_tokens"),
    ],
)
def test_adapter_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_forward_rejects_wrong_rank():
    adapter = LPKA(AdapterConfig(rank=4, dim=8, heads=2))
    adapter.register_shapes(SHAPES)
    _, sources = sources_for(SHAPES)
    a, b = batch((10, 48), rank=3)
    with pytest.raises(ValueError, match="rank 4"):
        adapter(a, b, sources)


def test_a_branch_is_multi_head_attention_written_out():
    """Queries (N, Lq, w) on keys of two widths: the branch's output and its gradients equal
    softmax(q_h k_hᵀ/√d) v_h per head, concatenated and projected back, as written here."""
    cfg = AdapterConfig(rank=4, dim=16, heads=2)
    branch = Branch(cfg, "ktl0.A_rows_rows", Capture())
    gen = torch.Generator().manual_seed(0)
    branch.q.register(4), branch.o.register(4)
    for w in (4, 6):
        branch.k.register(w), branch.v.register(w)
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    query = torch.randn(3, 5, 4, generator=gen, requires_grad=True)
    keys = [(4, torch.randn(7, 4, generator=gen)), (6, torch.randn(2, 6, generator=gen))]
    grad = torch.randn(3, 5, 4, generator=gen)

    def written_out():
        q = branch.q(query).reshape(3, 5, 2, 8)
        k = torch.cat([branch.k(t) for _, t in keys]).reshape(9, 2, 8)
        v = torch.cat([branch.v(t) for _, t in keys]).reshape(9, 2, 8)
        weights = torch.softmax(torch.einsum("nqhd,lhd->nhql", q, k) / math.sqrt(8), dim=-1)
        heads = torch.einsum("nhql,lhd->nqhd", weights, v).reshape(3, 5, 16)
        return branch.o(heads, 4)

    outs, grads = [], []
    for forward in (lambda: branch(query, keys), written_out):
        branch.zero_grad(set_to_none=True)
        query.grad = None
        out = forward()
        out.backward(grad)
        outs.append(out.detach())
        grads.append([query.grad, *(p.grad for p in branch.parameters())])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
