"""QTSplusSelector on its own: gates, budget, threshold, gradients, batching, dtypes, degenerate inputs, losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from qtsplus.selectors.base import compact, topk_keep
from qtsplus.selectors.qtsplus import (
    QTSplusSelector,
    SelectorConfig,
    attention_cost,
    budget_loss,
    budget_prior,
    budget_size,
    find_threshold,
    keep_log_prob,
    memory_cost,
    training_gate,
)
from qtsplus.selectors.qtsplus.selector import ScoringHead, _reference_head_scores

D = 32


def tiny_config(**overrides) -> SelectorConfig:
    shapes = dict(
        hidden_size=D, num_heads=4, num_kv_heads=2, intermediate_size=64, budget_hidden=32, time_dim=16
    )
    return SelectorConfig(**{**shapes, **overrides})


def make_selector(seed: int = 0, **overrides) -> QTSplusSelector:
    torch.manual_seed(seed)
    return QTSplusSelector(tiny_config(**overrides))


def ragged_batch(lengths: list[int], q_lengths: list[int], seed: int = 0):
    """Padded x [B, M, D], q [B, L, D], times [B, M] and masks, plus the unpadded pieces."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, D, generator=g) for m in lengths]
    qs = [torch.randn(n, D, generator=g) for n in q_lengths]
    ts = [torch.arange(m, dtype=torch.float32) * 0.5 for m in lengths]
    pad = torch.nn.utils.rnn.pad_sequence
    x_mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    q_mask = torch.arange(max(q_lengths))[None] < torch.tensor(q_lengths)[:, None]
    batch = (pad(xs, batch_first=True), pad(qs, batch_first=True), pad(ts, batch_first=True), x_mask, q_mask)
    return batch, list(zip(xs, qs, ts, strict=True))


def assert_ascending_unique(out) -> None:
    for idx, mask in zip(out.indices, out.token_mask, strict=True):
        kept = idx[mask]
        assert kept.numel() >= 1
        assert (kept[1:] > kept[:-1]).all(), "kept indices must be strictly ascending (hence unique)"


# ------------------------------------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("n_max", [3, 10_000])
def test_inference_keeps_top_n_in_temporal_order(n_max):
    sel = make_selector(n_max=n_max).eval()
    (x, q, t, xm, qm), _ = ragged_batch([300, 120, 7], [5, 2, 1])
    with torch.no_grad():
        out = sel(x, q, t, xm, qm)
    assert_ascending_unique(out)
    expected = torch.clamp(
        torch.ceil(out.rho.double() * out.num_tokens - 1e-4).long().clamp(max=n_max), min=1
    )
    assert torch.equal(out.budget, expected)
    assert torch.equal(out.num_kept, out.budget)
    assert (out.num_kept <= n_max).all()
    # the kept ones are exactly the top-n by relevance
    for b in range(3):
        m, n = int(out.num_tokens[b]), int(out.budget[b])
        top = out.scores[b, :m].topk(n).indices.sort().values
        assert torch.equal(out.indices[b, :n], top)
    assert torch.isfinite(out.tokens[out.token_mask]).all()


def test_budget_size_formula():
    rho = torch.tensor([0.05, 0.05, 0.2, 0.5, 0.5, 0.05])
    m = torch.tensor([2000, 2001, 7, 1, 100_000, 3])
    assert budget_size(rho, m, n_max=2560).tolist() == [100, 101, 2, 1, 2560, 1]


def test_rho_range():
    sel = make_selector(rho_min=0.1, rho_max=0.3).eval()
    # push the budget MLP to both saturations
    last = sel.budget_head.mlp[-1]
    (x, q, t, xm, qm), _ = ragged_batch([50, 40], [3, 3])
    for bias, target in [(50.0, 0.3), (-50.0, 0.1)]:
        with torch.no_grad():
            last.bias.fill_(bias)
            rho = sel(x, q, t, xm, qm).rho
        torch.testing.assert_close(rho, torch.full_like(rho, target))


# ------------------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("m", [2000, 50_000])
def test_training_kept_fraction_matches_rho(rho, m):
    """Over many seeds the mean kept fraction is rho (the public code's gate kept 19/33/50% for 5/20/50%)."""
    sel = make_selector(rho_min=rho, rho_max=rho, n_max=10**9, reencoder_depth=0).train()
    (x, q, t, xm, qm), _ = ragged_batch([m] * 4, [3] * 4, seed=m)
    gen = torch.Generator().manual_seed(0)
    fractions = []
    with torch.no_grad():
        for _ in range(5):  # 5 draws x 4 videos = 20 seeds
            out = sel(x, q, t, xm, qm, generator=gen)
            torch.testing.assert_close(out.keep_prob.sum(-1), torch.full((4,), rho * m), rtol=1e-4, atol=1e-2)
            fractions.append(out.num_kept.float() / m)
    mean = torch.cat(fractions).mean().item()
    assert abs(mean - rho) < 0.02, mean


def test_training_gate_follows_relevance():
    """tau_s acts on s = log(M r): at any M the gate prefers relevant tokens and keeps rho M in expectation."""
    g = torch.Generator().manual_seed(0)
    for m in (2000, 50_000):
        s = torch.randn(8, m, generator=g)  # scores in nats; the same law at both M
        mask = torch.ones_like(s, dtype=torch.bool)
        k = torch.full((8,), 0.2 * m)
        keep, gate, p, t, drawn = training_gate(s, mask, k, tau=0.5, n_max=10**9, generator=g)
        assert torch.equal(drawn, keep)  # no cap reached, never empty: the kept set is the draw
        torch.testing.assert_close(p.sum(-1), k, rtol=1e-4, atol=1e-2)
        assert abs(keep.float().mean().item() - 0.2) < 0.01
        top = s >= s.quantile(0.9, dim=-1, keepdim=True)
        bottom = s <= s.quantile(0.1, dim=-1, keepdim=True)
        assert keep[top].float().mean() > 0.5 and keep[bottom].float().mean() < 0.02
        torch.testing.assert_close(gate, keep.float())  # straight-through: the values are the hard decisions


def test_training_gate_caps_at_n_max_and_keeps_one():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 500, generator=g)
    mask = torch.ones_like(s, dtype=torch.bool)
    k = torch.full((3,), 250.0)
    drawn, *_ = training_gate(s, mask, k, tau=0.5, n_max=10**9, generator=torch.Generator().manual_seed(1))
    keep, *_ = training_gate(s, mask, k, tau=0.5, n_max=40, generator=torch.Generator().manual_seed(1))
    assert (drawn.sum(-1) > 40).all() and (keep.sum(-1) == 40).all()
    top_drawn = s.masked_fill(~drawn, -math.inf).topk(40, dim=-1).indices  # the most relevant of the drawn
    assert torch.equal(keep, torch.zeros_like(keep).scatter_(-1, top_drawn, True))
    keep, *_ = training_gate(s, mask, torch.full((3,), 1e-6), tau=0.5, n_max=40, generator=g)
    assert (keep.sum(-1) == 1).all() and torch.equal(keep.float().argmax(-1), s.argmax(-1))


def test_find_threshold_solves_and_differentiates():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 1000, generator=g) * torch.tensor([[0.1], [5.0]])).requires_grad_()
    s.data[1, :500] += 40.0  # a big gap: plain Newton from the median diverges here
    mask = torch.ones_like(s, dtype=torch.bool)
    k = torch.tensor([37.0, 620.0], requires_grad=True)
    t = find_threshold(s, mask, k, tau=0.5)
    kept = torch.sigmoid((s - t[:, None]) / 0.5).sum(-1)
    torch.testing.assert_close(kept, k, rtol=1e-4, atol=1e-3)
    # implicit gradient dt/dk against central finite differences
    (dt_dk,) = torch.autograd.grad(t.sum(), k)
    eps = 0.5
    fd = (find_threshold(s, mask, k + eps, 0.5) - find_threshold(s, mask, k - eps, 0.5)) / (2 * eps)
    torch.testing.assert_close(dt_dk, fd.detach(), rtol=2e-2, atol=1e-6)
    assert (dt_dk < 0).all()  # more tokens -> lower threshold


def test_find_threshold_ignores_padding():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, 300, generator=g)
    padded = torch.cat([s, torch.full((1, 100), -math.inf)], -1)
    mask = torch.arange(400)[None] < 300
    k = torch.tensor([30.0])
    torch.testing.assert_close(
        find_threshold(padded, mask, k, 0.5), find_threshold(s, torch.ones_like(s, dtype=torch.bool), k, 0.5)
    )


def test_gradients_reach_scorer_budget_head_and_reencoder():
    sel = make_selector(scoring_depth=2, reencoder_depth=2, n_max=10_000).train()
    (x, q, t, xm, qm), _ = ragged_batch([200, 90], [4, 2])
    with torch.no_grad():  # a trained-looking time projection so that its input path is exercised too
        sel.reencoder.time.proj.weight.normal_(std=0.02)
    out = sel(x, q, t, xm, qm, generator=torch.Generator().manual_seed(0))
    target = torch.randn_like(out.tokens)
    loss = ((out.tokens - target) ** 2)[out.token_mask].mean() + out.loss
    loss.backward()
    for name, p in sel.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
    # and the straight-through gate carries the task loss (not only Eq. 5) to rho
    sel.zero_grad()
    rho_grads = []
    out = sel(x, q, t, xm, qm, generator=torch.Generator().manual_seed(0))
    out.rho.register_hook(rho_grads.append)
    (out.tokens * target)[out.token_mask].sum().backward()
    assert rho_grads[0].abs().sum() > 0


def test_keep_log_prob_is_the_draws_log_likelihood():
    p = torch.tensor([[0.9, 0.2, 0.5], [0.3, 0.6, 0.0]])
    drawn = torch.tensor([[True, False, True], [True, False, False]])  # row 1 has M = 2 (its third slot is padding)
    lp = keep_log_prob(p, drawn, torch.tensor([3, 2]))
    expected = [math.log(0.9) + math.log(0.8) + math.log(0.5), math.log(0.3) + math.log(0.4)]
    torch.testing.assert_close(lp, torch.tensor(expected))


def test_keep_log_prob_scores_the_draw_not_the_capped_set():
    """n_max drops drawn tokens, an empty draw gets its best token forced in, both after the draw: log P is of the
    draw (the kept set is a fixed function of it). Generator seeds 3 and 5 give those two cases here."""
    sel = make_selector(n_max=5, rho_min=0.5, rho_max=0.5).train()  # E[#drawn] = min(rho M, n_max) = 5
    (x, q, t, xm, qm), _ = ragged_batch([60, 40], [4, 2])
    capped = sel(x, q, t, xm, qm, generator=torch.Generator().manual_seed(3))
    empty = sel(x, q, t, xm, qm, generator=torch.Generator().manual_seed(5))
    assert (capped.drawn.sum(-1) > 5).all() and (capped.num_kept == 5).all()
    assert empty.drawn[1].sum() == 0 and empty.num_kept[1] == 1
    for out in (capped, empty):
        kept = torch.zeros(xm.shape).scatter_add_(1, out.indices, out.token_mask.float()).bool() & xm
        torch.testing.assert_close(out.keep_log_prob(), keep_log_prob(out.keep_prob, out.drawn, out.num_tokens))
        assert not torch.allclose(out.keep_log_prob(), keep_log_prob(out.keep_prob, kept, out.num_tokens))
        assert not (kept & ~out.drawn).any() if out is capped else (kept & ~out.drawn).sum() == 1


def test_score_function_term_reaches_the_tokens_the_gate_dropped():
    """The straight-through gate passes the task loss to kept tokens only; log P(keep pattern) reaches every token."""
    sel = make_selector(n_max=10_000).train()
    (x, q, t, xm, qm), _ = ragged_batch([60, 40], [4, 2])
    out = sel(x, q, t, xm, qm, generator=torch.Generator().manual_seed(0))
    out.keep_prob.retain_grad()
    (out.tokens * torch.randn_like(out.tokens))[out.token_mask].sum().backward(retain_graph=True)
    kept = torch.zeros(xm.shape).scatter_add_(1, out.indices, out.token_mask.float()).bool() & xm  # padding: index 0
    dropped = xm & ~kept
    assert dropped.any() and out.keep_prob.grad[kept].abs().sum() > 0
    assert (out.keep_prob.grad[dropped] == 0).all()
    out.keep_prob.grad = None
    out.keep_log_prob().sum().backward()
    assert (out.keep_prob.grad[dropped] != 0).all()  # -1 / (1 - p_i)
    assert (out.keep_prob.grad[~xm] == 0).all()


# -------------------------------------------------------------------------------------- scorer: folded norm, streamed


def scoring_inputs(lengths: list[int], q_lengths: list[int], dtype: torch.dtype, seed: int = 0):
    """A selector whose scoring head has a non-trivial x-side norm weight and k bias (so folding them is exercised)
    and q/k weights that spread log r over a few nats (as a trained head does), and a padded batch in `dtype`."""
    sel = make_selector(seed=seed)
    spread_scores(sel)
    sel = sel.to(dtype)
    (x, q, _, xm, qm), _ = ragged_batch(lengths, q_lengths, seed=seed)
    return sel, x.to(dtype), q.to(dtype), xm, qm


@torch.no_grad()
def spread_scores(sel: QTSplusSelector) -> None:
    head = sel.scorer.head
    head.x_norm.weight.uniform_(0.2, 2.0)
    head.k_proj.bias.normal_()
    head.q_proj.weight.normal_(std=0.3)  # log r spread ~1.6 nats at M = 1000 (~0.01 at the 0.02 init)
    head.k_proj.weight.normal_(std=0.3)


def assert_matches_reference(head, x: Tensor, xm: Tensor, q: Tensor, qm: Tensor, new: Tensor, n: int) -> Tensor:
    """`new` (log r [B, M]) against `_reference_head_scores` (returned). float32: within 1e-5 nats and the same top-n
    token for token. bfloat16, where the reference itself is off by bf16 rounding: no less accurate than the reference
    against a float64 evaluation of the same weights and inputs, and a top-n that differs from the reference's only
    by swaps among tokens within that rounding of the n-th score."""
    with torch.no_grad():
        ref = _reference_head_scores(head, x, xm, q, qm)
    assert new.dtype == torch.float32 and new.shape == ref.shape
    assert torch.equal(new == -math.inf, ~xm) and torch.equal(ref == -math.inf, ~xm)  # -inf exactly at padding
    tol = 0.0
    if x.dtype == torch.float32:
        torch.testing.assert_close(new[xm], ref[xm], rtol=0, atol=1e-5)
    else:
        with torch.no_grad():
            truth = _reference_head_scores(copy.deepcopy(head).double(), x.double(), xm, q.double(), qm)
        err_new, err_ref = (new - truth)[xm].abs(), (ref - truth)[xm].abs()
        assert err_new.mean() <= 1.25 * err_ref.mean() and err_new.max() <= 1.5 * err_ref.max(), (
            float(err_new.mean()), float(err_ref.mean()), float(err_new.max()), float(err_ref.max()))  # fmt: skip
        tol = float(err_new.max() + err_ref.max())
    for b in range(ref.shape[0]):
        m = int(xm[b].sum())
        k = min(n, m)
        top_ref, top_new = set(ref[b, :m].topk(k).indices.tolist()), set(new[b, :m].topk(k).indices.tolist())
        if tol == 0.0:
            assert top_new == top_ref, b
        cut = ref[b, :m].topk(k).values[-1]
        for i in top_ref ^ top_new:
            assert abs(float(ref[b, i] - cut)) <= tol, (b, i, float(ref[b, i]), float(cut))
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 64, 1000])
def test_streamed_scorer_matches_reference(dtype, block_size):
    """Folded norm + streamed log-softmax give the r of the original head: several M (1, below, at, above and not a
    multiple of the block), padded videos (whole blocks of padding) and padded question tokens."""
    sel, x, q, xm, qm = scoring_inputs([1000, 64, 65, 1, 130], [5, 1, 3, 2, 5], dtype)
    head = sel.scorer.head
    head.block_size = block_size
    with torch.no_grad():
        new = head(x, xm, q, qm)
    assert_matches_reference(head, x, xm, q, qm, new, n=50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_scorer_at_larger_m(dtype):
    """A long video next to a short one, blocks sized by `block_bytes`: 1 MiB of logits = 4681 tokens here (B = 2,
    h = 4, L = 7), so two blocks, the second ragged and, for the short video, all padding."""
    sel, x, q, xm, qm = scoring_inputs([9001, 4096], [7, 3], dtype, seed=1)
    head = sel.scorer.head
    head.block_bytes = (2**20, 2**20)
    with torch.inference_mode():
        new = head(x, xm, q, qm)
    assert_matches_reference(head, x, xm, q, qm, new, n=900)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_scorer_gives_the_same_budget_and_selection(dtype):
    """Through the whole selector (scoring depth 2): the budget head's inputs max r and H(p), rho, n and the kept
    indices equal those computed from the original head's r."""
    sel = make_selector(seed=2, scoring_depth=2, n_max=10_000)
    spread_scores(sel)
    sel = sel.to(dtype).eval()
    sel.scorer.head.block_size = 128
    (x, q, _, xm, qm), _ = ragged_batch([700, 300, 41], [6, 2, 4], seed=2)
    x, q = x.to(dtype), q.to(dtype)
    with torch.no_grad():
        out = sel(x, q, torch.zeros(xm.shape), xm, qm)
        question = sel.scorer.blocks[0](q, xm, context=x)
    n = int(out.budget.min())
    ref = assert_matches_reference(sel.scorer.head, x, xm, question, qm, out.scores.log(), n)
    num_tokens = xm.sum(-1)
    r_ref, r_new = ref.exp().masked_fill(~xm, 0.0), out.scores

    def features(r: Tensor) -> tuple[Tensor, Tensor]:  # what BudgetHead reads from the scorer
        p = r / (r.sum(-1, keepdim=True) + 1e-8)
        return r.amax(-1), -(p * p.clamp_min(1e-30).log()).sum(-1)

    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-3)
    for a, b in zip(features(r_new), features(r_ref), strict=True):
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():
        rho_ref = sel.budget_head(q, qm, r_ref, num_tokens)
    torch.testing.assert_close(out.rho, rho_ref, **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)))
    if dtype == torch.float32:
        assert torch.equal(out.budget, budget_size(rho_ref, num_tokens, 10_000))
        s_ref = ref + num_tokens.float().log()[:, None]
        indices, mask = compact(topk_keep(s_ref, out.budget))
        assert torch.equal(out.indices, indices) and torch.equal(out.token_mask, mask)


def test_streamed_scorer_allocates_no_m_by_d_tensor():
    """The folded norm makes no [M, d] tensor: the streamed head's largest allocation is its keys [M, h_kv d_h] (half
    of X here), where the reference's RMSNorm allocates X's size."""
    sel, x, q, xm, qm = scoring_inputs([5000], [5], torch.float32)
    head = sel.scorer.head
    head.block_bytes = (2**16, 2**16)  # 64 KiB of float32 logits: 819 tokens per block at h = 4, L = 5

    def largest_allocation(fn) -> int:
        with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
            fn()
        return max(e.self_cpu_memory_usage for e in prof.events())

    keys_bytes = x.shape[1] * head.k_proj.out_features * 4
    assert largest_allocation(lambda: head(x, xm, q, qm)) == keys_bytes < x.numel() * 4
    assert largest_allocation(lambda: _reference_head_scores(head, x, xm, q, qm)) >= x.numel() * 4


def test_scorer_training_form_has_the_reference_gradients():
    """Under autograd the head is the folded whole-logit form: the reference's values and gradients (for the x-side
    norm weight, k_proj, q_proj, and the inputs)."""
    sel, x, q, xm, qm = scoring_inputs([120, 47], [4, 2], torch.float32, seed=3)
    head = sel.scorer.head
    x.requires_grad_()
    weights = torch.randn(xm.shape).masked_fill(~xm, 0.0)  # an arbitrary loss on the finite scores

    def grads(fn) -> list[Tensor]:
        head.zero_grad()
        x.grad = None
        log_r = fn(head, x, xm, q, qm)
        (log_r.masked_fill(~xm, 0.0) * weights).sum().backward()
        return [log_r.detach(), x.grad, head.x_norm.weight.grad, head.k_proj.weight.grad, head.q_proj.weight.grad,
                head.q_norm.weight.grad]  # fmt: skip

    new, ref = grads(ScoringHead.forward), grads(_reference_head_scores)
    for a, b in zip(new, ref, strict=True):  # float32 rounding, relative to each gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))


def test_scorer_streams_without_autograd_only():
    """no_grad / inference_mode take the streamed form, grad mode the differentiable one; both agree."""
    sel, x, q, xm, qm = scoring_inputs([300, 100], [3, 3], torch.float32, seed=4)
    head = sel.scorer.head
    head.block_size = 32
    whole = head(x, xm, q, qm)
    assert whole.requires_grad  # parameters require grad: the differentiable form
    with torch.no_grad():
        streamed = head(x, xm, q, qm)
    with torch.inference_mode():
        inference = head(x, xm, q, qm)
    assert not streamed.requires_grad
    assert torch.equal(streamed, inference)
    torch.testing.assert_close(streamed, whole.detach(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- batching, dtypes


def test_batch_equals_one_by_one():
    sel = make_selector(scoring_depth=2, reencoder_depth=1)
    with torch.no_grad():
        sel.reencoder.time.proj.weight.normal_(std=0.02)
    (x, q, t, xm, qm), pieces = ragged_batch([150, 37, 1, 90], [5, 1, 3, 2], seed=3)
    with torch.no_grad():
        sel.eval()
        batch = sel(x, q, t, xm, qm)
        sel.train()
        batch_train = sel(x, q, t, xm, qm)
        for b, (xb, qb, tb) in enumerate(pieces):
            sel.eval()
            one = sel(xb[None], qb[None], tb[None])
            n = int(one.num_kept[0])
            assert int(batch.num_kept[b]) == n
            assert torch.equal(batch.indices[b, :n], one.indices[0])
            torch.testing.assert_close(batch.tokens[b, :n], one.tokens[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch.scores[b, : xb.shape[0]], one.scores[0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(batch.rho[b], one.rho[0])
            sel.train()
            one = sel(xb[None], qb[None], tb[None])
            torch.testing.assert_close(batch_train.threshold[b], one.threshold[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                batch_train.keep_prob[b, : xb.shape[0]], one.keep_prob[0], rtol=1e-5, atol=1e-6
            )
            assert (batch_train.keep_prob[b, xb.shape[0] :] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_dtypes(dtype, training):
    sel = make_selector(n_max=10_000).to(dtype).train(training)
    assert sel.rho_bar.dtype == torch.float32  # the EMA is not rounded to bf16
    (x, q, t, xm, qm), _ = ragged_batch([400, 100], [6, 3])
    out = sel(x.to(dtype), q.to(dtype), t, xm, qm, generator=torch.Generator().manual_seed(0))
    assert out.tokens.dtype == dtype
    assert out.rho.dtype == torch.float32 and out.scores.dtype == torch.float32
    assert torch.isfinite(out.tokens[out.token_mask]).all()
    assert_ascending_unique(out)
    if training:
        torch.testing.assert_close(out.keep_prob.sum(-1), out.rho * out.num_tokens, rtol=1e-3, atol=1e-2)
        out.tokens[out.token_mask].float().sum().add(out.loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in sel.parameters() if p.grad is not None)


@pytest.mark.parametrize("case", ["M=1", "L=1", "all-equal"])
@pytest.mark.parametrize("training", [False, True])
def test_degenerate_inputs_have_no_nan(case, training):
    sel = make_selector(scoring_depth=2).train(training)
    x, q = torch.randn(2, 64, D), torch.randn(2, 4, D)
    if case == "M=1":
        x = x[:, :1]
    if case == "L=1":
        q = q[:, :1]
    if case == "all-equal":
        x = x[:, :1].expand(-1, 64, -1).contiguous()  # every token the same: all scores tie
    x.requires_grad_()
    times = torch.zeros(x.shape[:2])
    out = sel(x, q, times, generator=torch.Generator().manual_seed(0))
    assert (
        torch.isfinite(out.tokens).all()
        and torch.isfinite(out.rho).all()
        and torch.isfinite(out.scores).all()
    )
    assert (out.num_kept >= 1).all()
    assert_ascending_unique(out)
    if case == "all-equal":
        torch.testing.assert_close(out.scores, torch.full_like(out.scores, 1 / 64))
    loss = out.tokens.sum() + (out.loss if training else 0.0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in sel.parameters() if p.grad is not None)


def test_compact_and_topk_keep():
    keep = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, mask = compact(keep)
    assert idx.tolist() == [[1, 3, 4], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    s = torch.tensor([[0.1, 0.9, 0.5, -math.inf], [3.0, 2.0, 1.0, 0.0]])
    assert topk_keep(s, torch.tensor([2, 1])).tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]


# ------------------------------------------------------------------------------------------------- time, losses, state


def test_reencoder_injects_absolute_time():
    sel = make_selector(reencoder_depth=1)
    z = torch.randn(1, 6, D)
    mask = torch.ones(1, 6, dtype=torch.bool)
    t = torch.tensor([[0.0, 2.0, 4.0, 6.0, 8.0, 10.0]])
    with torch.no_grad():
        assert torch.equal(sel.reencoder.time(t), torch.zeros(1, 6, D))  # zero at init
        sel.reencoder.time.proj.weight.normal_()
        a = sel.reencoder(z, t, mask)
        b = sel.reencoder(z, t + 30.0, mask)  # the same tokens half a minute later
        c = sel.reencoder(z, t.flip(-1), mask)  # the same tokens in reverse time order
    assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(a, c, atol=1e-3)
    emb = sel.reencoder.time(torch.tensor([[0.0, 1.0, 1.0, 3600.0]]))
    assert torch.equal(emb[0, 1], emb[0, 2]) and not torch.allclose(emb[0, 0], emb[0, 1])


def test_loss_terms_are_eq5():
    rho = torch.tensor([0.1, 0.4], requires_grad=True)
    m = torch.tensor([2000, 50_000])
    n_max = 2560
    torch.testing.assert_close(attention_cost(rho, m, n_max), (rho * m / n_max) ** 2)
    torch.testing.assert_close(memory_cost(rho, m, n_max), rho * m / n_max)
    torch.testing.assert_close(budget_prior(rho, torch.tensor(0.25)), (rho - 0.25) ** 2)
    loss = budget_loss(rho, m, n_max, torch.tensor(0.25), lambda_t=1.0, lambda_m=1.7, lambda_s=0.05)
    (grad,) = torch.autograd.grad(loss, rho)
    # the paper's derivatives, 2 rho M^2 / n_max^2 and M / n_max, plus the prior's, averaged over the batch
    expected = (2 * rho * m**2 / n_max**2 + 1.7 * m / n_max + 0.05 * 2 * (rho - 0.25)) / 2
    torch.testing.assert_close(grad, expected.detach())


def test_rho_bar_is_a_checkpointed_ema():
    sel = make_selector(rho_bar_momentum=0.5, rho_min=0.2, rho_max=0.2, rho_bar_init=0.4)
    assert "rho_bar" in sel.state_dict() and sel.rho_bar.item() == pytest.approx(0.4)
    (x, q, t, xm, qm), _ = ragged_batch([30, 20], [2, 2])
    with torch.no_grad():
        sel.eval()(x, q, t, xm, qm)
        assert sel.rho_bar.item() == pytest.approx(0.4)  # eval does not move it
        sel.train()(x, q, t, xm, qm)
        assert sel.rho_bar.item() == pytest.approx(0.3)
        sel(x, q, t, xm, qm)
        assert sel.rho_bar.item() == pytest.approx(0.25)
    restored = make_selector(seed=1, rho_bar_momentum=0.5, rho_min=0.2, rho_max=0.2, rho_bar_init=0.4)
    restored.load_state_dict(sel.state_dict())
    assert restored.rho_bar.item() == pytest.approx(0.25)


def test_init_from_decoder_layers_copies_when_shapes_match():
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    torch.manual_seed(0)
    text = Qwen2_5_VLTextConfig(
        vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    lm = Qwen2_5_VLTextModel(text)
    for p in lm.parameters():  # make norms and biases distinguishable from a fresh init
        torch.nn.init.normal_(p)
    sel = QTSplusSelector(
        SelectorConfig.from_text_config(text, scoring_depth=2, reencoder_depth=2, time_dim=16)
    )
    copied = sel.init_from_decoder_layers(lm.layers)
    assert copied == [
        "scorer.blocks.0 <- 0",
        "scorer.head <- 1",
        "reencoder.blocks.0 <- 0",
        "reencoder.blocks.1 <- 1",
    ]
    layer0, layer1 = lm.layers[0], lm.layers[1]
    assert torch.equal(sel.scorer.blocks[0].attn.v_proj.weight, layer0.self_attn.v_proj.weight)
    assert torch.equal(sel.scorer.blocks[0].context_norm.weight, layer0.input_layernorm.weight)
    assert torch.equal(sel.scorer.head.q_proj.weight, layer1.self_attn.q_proj.weight)
    assert torch.equal(sel.scorer.head.k_proj.bias, layer1.self_attn.k_proj.bias)
    assert torch.equal(sel.scorer.head.x_norm.weight, layer1.input_layernorm.weight)
    assert torch.equal(sel.reencoder.blocks[1].mlp.down_proj.weight, layer1.mlp.down_proj.weight)
    assert torch.equal(sel.reencoder.blocks[1].post_norm.weight, layer1.post_attention_layernorm.weight)
    # a re-encoder with another FFN width does not match: it keeps its own init, the scorer is still copied
    narrow = QTSplusSelector(SelectorConfig.from_text_config(text, intermediate_size=32, time_dim=16))
    assert narrow.init_from_decoder_layers(lm.layers) == ["scorer.head <- 0"]
