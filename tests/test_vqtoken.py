"""VQToken: cosine K-means recovers planted clusters, is seeded, the elbow finds the planted K, the codebook / index
map / anchors are consistent, VQ-Attention trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtsplus.selectors import SelectorInput, build_selector, cosine_kmeans, elbow

D = 32
GRID = (6, 4, 4)  # 96 tokens


def tiny(**overrides):
    torch.manual_seed(0)
    config = dict(hidden_size=D, num_heads=4, map_hidden=16, map_grid=(2, 2, 2), k_min=2, k_max=10)
    return build_selector("vqtoken", **{**config, **overrides})


def planted(k: int = 5, noise: float = 0.05, seed: int = 0, batch: int = 1):
    """Tokens = one of k random directions (random scale 1..3) + small noise, scattered over the grid."""
    g = torch.Generator().manual_seed(seed)
    m = GRID[0] * GRID[1] * GRID[2]
    centres = F.normalize(torch.randn(k, D, generator=g), dim=-1)
    labels = torch.randint(k, (batch, m), generator=g)
    labels[:, :k] = torch.arange(k)  # every cluster present
    scale = 1 + 2 * torch.rand(batch, m, 1, generator=g)
    x = scale * (centres[labels] + noise * torch.randn(batch, m, D, generator=g))
    inputs = SelectorInput.from_grid(x, torch.randn(batch, 3, D, generator=g), GRID, seconds_per_step=0.5)
    return inputs, labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def assignments(out, b: int = 0) -> torch.Tensor:
    """Cluster of every token of video b, read back from the index map at the tokens' positions."""
    index_map = out.extras[b]["index_map"]
    return index_map.flatten()  # from_grid lays tokens out t-major, as the map


def test_kmeans_recovers_planted_clusters_exactly():
    inputs, labels = planted(k=5)
    out = tiny()(inputs, 5)  # fixed mode: K = the budget
    assert int(out.num_kept[0]) == 5 and out.extras[0]["num_clusters"] == 5
    assert same_partition(assignments(out), labels[0])
    unit = F.normalize(inputs.x[0], dim=-1)
    assign, inertia = cosine_kmeans(unit, 5, torch.Generator().manual_seed(1), iters=50)
    assert same_partition(assign, labels[0]) and inertia < 0.1 * 96  # noise: 1 - cos ~ 0.04 per token


def test_codebook_index_map_and_anchors():
    inputs, labels = planted(k=4, batch=2)
    selector = tiny()
    with torch.no_grad():
        out = selector(inputs, 4)
    for b in range(2):
        assign = assignments(out, b)
        assert (assign >= 0).all() and out.extras[b]["cluster_sizes"].sum() == 96
        for k in range(4):
            members = (assign == k).nonzero()[:, 0]
            assert int(out.indices[b, k]) == int(members[0])  # token k stands at its cluster's first member
            # residual VQ-Attention starts as the identity: the output is the codebook, the members' mean
            torch.testing.assert_close(out.tokens[b, k], inputs.x[b, members].mean(0))
            torch.testing.assert_close(out.extras[b]["mean_times"][k], inputs.times[b, members].mean())
        assert torch.equal(out.positions[b], inputs.positions[b, out.indices[b]])


def test_seeded_and_deterministic():
    inputs, _ = planted(k=8, noise=1.0)  # no clear clusters: the seeding decides
    first = tiny()(inputs, 8)
    again = tiny()(inputs, 8)
    assert torch.equal(first.extras[0]["index_map"], again.extras[0]["index_map"])
    assert torch.equal(first.tokens, again.tokens)
    other = [tiny(seed=s)(inputs, 8).extras[0]["index_map"] for s in (1, 2, 3)]
    assert any(not same_partition(o.flatten(), first.extras[0]["index_map"].flatten()) for o in other)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(tiny()(inputs, 8, generator=gen).extras[0]["index_map"], first.extras[0]["index_map"])


@pytest.mark.parametrize("k", [3, 5, 7])
def test_adaptive_k_finds_the_planted_k(k):
    inputs, labels = planted(k=k, seed=k)
    selector = tiny(mode="adaptive")
    assert not selector.fills_budget
    out = selector(inputs, 0.5)
    assert out.extras[0]["num_clusters"] == k and int(out.num_kept[0]) == k
    assert out.extras[0]["elbow_ks"] == list(range(2, 11))
    assert same_partition(assignments(out), labels[0])
    out = selector(inputs, 2)  # the budget caps the range
    assert int(out.num_kept[0]) <= 2


def test_elbow_rule():
    assert elbow([2, 3, 4, 5, 6, 7], [100.0, 60.0, 25.0, 3.0, 2.5, 2.0]) == 5
    assert elbow([2, 3, 4, 5, 6, 7, 8], [50.0, 30.0, 20.0, 3.2, 3.1, 6.0, 3.0]) == 5  # a stuck run is no gain
    assert elbow([12, 13], [5.0, 4.0]) == 12
    assert elbow([12, 13, 14], [1.0, 1.0, 1.0]) == 12


@pytest.mark.parametrize("residual", [True, False])
def test_vq_attention_trains(residual):
    inputs, _ = planted(k=4, batch=2)
    inputs.x.requires_grad_(True)
    selector = tiny(residual=residual).train()
    optimizer = torch.optim.AdamW(selector.parameters(), lr=1e-2)
    target = torch.randn(2, 4, D)
    losses = []
    # with residual=True W_O starts at zero: the other weights get gradients from the second step on
    for _ in range(2):
        out = selector(inputs, 4)
        loss = (out.tokens - target)[out.token_mask].square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for name, p in selector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert inputs.x.grad.abs().sum() > 0  # through the codebook means
    assert losses[1] < losses[0]
