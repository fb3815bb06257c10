"""VQToken: the video as K synthesized tokens, the codebook of a cosine K-means over its visual tokens, enriched
with the token index map by VQ-Attention. Paper: "Extreme Short Token Reduction for Video LLMs" (Sec. 3.2).

Top-down: `VQToken` (per video: cluster -> codebook -> index map -> occupancy) -> `cosine_kmeans` (k-means++ seeding,
`kmeans_pp_init`) and `elbow` (adaptive K) -> `VQAttention` (Eq. 6-7).

Shapes: B videos, M visual tokens (padded, `x_mask`), d hidden size, K clusters (padded to the batch's largest),
(T, H, W) the LM token grid of a video, P = prod(map_grid) cells of the pooled index map.

1. Clustering (Eq. 3): the tokens are L2-normalised and clustered by cosine similarity (spherical K-means: assign to
   the most similar centroid, centroid = normalised mean of its members, until no assignment changes or
   `kmeans_iters`), seeded by k-means++ (D = 1 - cos) with a seeded generator. K is the budget (fixed mode;
   `num_clusters` caps it) or, in adaptive mode, the elbow of the inertia curve W(K) = sum_i (1 - cos(x_i, c_{c_i}))
   over K in [k_min, k_max] (capped by the budget): the K whose own gain W(K-1) - W(K) is largest relative to the
   largest gain still to come from more clusters (where the curve turns flat; see `elbow`).
2. Codebook (Eq. 4): b_k = mean of cluster k's ORIGINAL (unnormalised) tokens: differentiable in x, and on the LM's
   scale. Clusters are numbered by their first member (lowest index in x), so outputs ascend like kept tokens.
3. Index map (Eq. 5): M[t, h, w] = cluster of the token at (t, h, w) (-1 where the grid has no token).
4. VQ-Attention (Eq. 6-7): M~ = MLP(map_k) with map_k the flattened index map of cluster k, i.e. its one-hot
   occupancy, pooled to a fixed grid (each of the P cells holds the fraction of its grid positions that belong to
   cluster k; the fixed size makes the MLP independent of T, H, W); B' = MHA(Q = B W_Q, K = B W_K, V = M~ W_V)
   (with the usual output projection W_O). residual=True (default) returns B + B' with W_O zero-initialised, so an
   untrained VQ-Attention hands the LM the plain codebook (what the public code feeds); residual=False returns B' as
   Eq. 7 writes it.
5. Output: K tokens; token k stands at its cluster's first member (`indices`), so the host gives it that slot's
   (t, h, w) rotary id; each cluster's mean time is in the diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from qtsplus.selectors.base import Selection, Selector, SelectorInput, register, selection_at


@dataclass
class VQTokenConfig:
    hidden_size: int = 2048
    mode: str = "fixed"  # "fixed": K = the budget (capped by num_clusters); "adaptive": K by the elbow rule
    num_clusters: int | None = None  # fixed mode: a cap on K (None: K = the budget)
    k_min: int = 12  # adaptive range (paper: 12..32), capped by the budget
    k_max: int = 32
    kmeans_iters: int = 50
    kmeans_restarts: int = 3  # k-means++ runs per K; the one with the lowest inertia is kept
    seed: int = 0  # k-means++ seeding when no generator is passed: the same input gives the same clusters
    num_heads: int = 16  # VQ-Attention
    map_grid: tuple[int, int, int] = (8, 4, 4)  # the index map pooled to (t, h, w) cells for the MLP
    map_hidden: int = 1024
    residual: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        assert self.mode in ("fixed", "adaptive")
        assert 1 <= self.k_min <= self.k_max and self.hidden_size % self.num_heads == 0


@register
class VQToken(Selector):
    name = "vqtoken"
    config_class = VQTokenConfig

    def __init__(self, config: VQTokenConfig) -> None:
        super().__init__(config)
        self.vq_attention = VQAttention(config)
        self.fills_budget = config.mode == "fixed" and config.num_clusters is None

    @classmethod
    def shape_fields(cls, text_config: Any) -> dict[str, Any]:
        return dict(hidden_size=text_config.hidden_size, num_heads=text_config.num_attention_heads)

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        x = inputs.x
        generator = generator or torch.Generator(device=x.device).manual_seed(self.config.seed)
        codebooks, occupancies, anchors, extras = [], [], [], []
        for b in range(x.shape[0]):
            real = inputs.x_mask[b].nonzero()[:, 0]  # [M_b]
            xb, pos, times = x[b, real], inputs.positions[b, real], inputs.times[b, real]
            with torch.no_grad():
                assign, info = self.cluster(xb, int(n[b]), generator)  # [M_b] in 0..K-1, by first member
            K = int(assign.max()) + 1
            one_hot = F.one_hot(assign, K).to(xb.dtype)  # [M_b, K]
            sizes = one_hot.sum(0)  # [K]
            codebooks.append((one_hot.T @ xb) / sizes[:, None])  # Eq. 4: [K, d]
            anchors.append(real[first_members(assign, K)])  # [K] ascending: clusters are numbered so
            grid = pos.amax(0) + 1  # (T, H, W)
            index_map = torch.full(grid.tolist(), -1, dtype=torch.long, device=x.device)
            index_map[pos[:, 0], pos[:, 1], pos[:, 2]] = assign  # Eq. 5
            occupancies.append(map_occupancy(assign, pos, grid, self.config.map_grid, K))  # [K, P]
            mean_times = (one_hot.T.float() @ times.float()) / sizes.float()
            sizes, mean_times, index_map = sizes.long().cpu(), mean_times.cpu(), index_map.cpu()
            extras.append(
                dict(num_clusters=K, cluster_sizes=sizes, mean_times=mean_times, index_map=index_map, **info)
            )

        codebook = pad_sequence(codebooks, batch_first=True)  # [B, K, d]
        occupancy = pad_sequence(occupancies, batch_first=True)  # [B, K, P]
        indices = pad_sequence(anchors, batch_first=True)  # [B, K]
        counts = torch.tensor([len(a) for a in anchors], device=x.device)  # [B] K per video
        mask = torch.arange(codebook.shape[1], device=x.device) < counts[:, None]  # [B, K]
        tokens = self.vq_attention(codebook, occupancy, mask)  # [B, K, d]
        return selection_at(inputs, indices, mask, tokens, n, extras=extras)

    def cluster(self, x: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        """x [M, d], budget n -> assignments [M] numbered 0..K-1 by first member (empty clusters dropped), info."""
        cfg = self.config
        unit = F.normalize(x.float(), dim=-1)
        cap = min(n, x.shape[0])
        if cfg.mode == "fixed":
            k = min(cap, cfg.num_clusters or cap)
            assign, _ = cosine_kmeans(unit, k, generator, cfg.kmeans_iters, cfg.kmeans_restarts)
            info: dict[str, Any] = {}
        else:
            ks = list(range(min(cfg.k_min, cap), min(cfg.k_max, cap) + 1))
            runs = [cosine_kmeans(unit, k, generator, cfg.kmeans_iters, cfg.kmeans_restarts) for k in ks]
            k = elbow(ks, [inertia for _, inertia in runs])
            assign = runs[ks.index(k)][0]
            info = dict(elbow_ks=ks, elbow_inertias=[inertia for _, inertia in runs])
        return number_by_first_member(assign), info


# ---------------------------------------------------------------------------------------------------------------------
# clustering


def kmeans_pp_init(unit: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding under D(x) = 1 - max cos(x, chosen): indices [k] of the first centroids. unit: [M, d]."""
    M = unit.shape[0]
    chosen = [torch.randint(M, (1,), generator=generator, device=generator.device).to(unit.device)]
    dist = (1 - unit @ unit[chosen[0]].T).squeeze(-1).clamp_min(0)  # [M]
    for _ in range(k - 1):
        weights = dist.square()
        if float(weights.sum()) <= 0:  # every token sits on a centroid: take any token not chosen yet
            weights = torch.ones_like(dist).index_fill_(0, torch.cat(chosen), 0.0)
        nxt = torch.multinomial(weights, 1, generator=generator)
        chosen.append(nxt)
        dist = torch.minimum(dist, (1 - unit @ unit[nxt].T).squeeze(-1).clamp_min(0))
    return torch.cat(chosen)


def cosine_kmeans(
    unit: Tensor, k: int, generator: torch.Generator, iters: int, restarts: int = 1
) -> tuple[Tensor, float]:
    """Spherical K-means on unit vectors [M, d]: assignments [M] in 0..k-1 and the inertia sum_i (1 - cos), the
    best of `restarts` k-means++ runs."""
    runs = [_cosine_kmeans_run(unit, k, generator, iters) for _ in range(restarts)]
    return min(runs, key=lambda run: run[1])


def _cosine_kmeans_run(unit: Tensor, k: int, generator: torch.Generator, iters: int) -> tuple[Tensor, float]:
    """One run: centroids are the normalised member means; a cluster that empties is re-seeded at the token farthest
    from its centroid; stops when no assignment changes. Sums are one-hot matmuls (deterministic on GPU too)."""
    centroids = unit[kmeans_pp_init(unit, k, generator)]  # [k, d]
    assign = None
    for _ in range(iters):
        sim = unit @ centroids.T  # [M, k]
        new = sim.argmax(-1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        one_hot = F.one_hot(assign, k).to(unit.dtype)  # [M, k]
        sums = one_hot.T @ unit  # [k, d]
        empty = one_hot.sum(0) == 0
        if bool(empty.any()):
            worst = sim.amax(-1).argsort()[: int(empty.sum())]
            sums[empty] = unit[worst]
        centroids = F.normalize(sums, dim=-1)
    sim = unit @ centroids.T
    best = sim.max(-1)
    return best.indices, float((1 - best.values).sum())


def elbow(ks: list[int], inertias: list[float]) -> int:
    """The elbow of the inertia curve W(K): the K whose own gain W(K-1) - W(K) is largest relative to the largest gain
    any further cluster still brings, max_{j > K} W(j-1) - W(j), plus 1% of the curve's total drop (gains below that
    count as flat). W is first made non-increasing (a running minimum: a K-means run stuck in a worse optimum than
    one with fewer clusters is no gain). Interior K only; fewer than 3 values, or a flat curve, give the smallest K."""
    w = torch.tensor(inertias, dtype=torch.float64).cummin(0).values
    drop = float(w[0] - w[-1])
    if len(ks) < 3 or drop <= 0:
        return ks[0]
    gain = w[:-1] - w[1:]  # gain[i]: from ks[i] to ks[i + 1], >= 0
    later = gain.flip(0).cummax(0).values.flip(0)  # later[i] = max(gain[i:])
    ratio = gain[:-1] / (later[1:] + 0.01 * drop)  # for K = ks[1], ..., ks[-2]
    return ks[1 + int(ratio.argmax())]


def first_members(assign: Tensor, k: int) -> Tensor:
    """[k] lowest token index of each cluster label (M for an empty label). assign: [M] in 0..k-1."""
    M = assign.shape[0]
    index = torch.arange(M, device=assign.device)
    return torch.full((k,), M, device=assign.device).scatter_reduce(0, assign, index, "amin")


def number_by_first_member(assign: Tensor) -> Tensor:
    """Relabel clusters 0..K-1 in order of their first member (lowest token index); empty labels disappear."""
    first = first_members(assign, int(assign.max()) + 1)
    used = first < assign.shape[0]
    rank = torch.full_like(first, -1)
    rank[first.argsort()[: int(used.sum())]] = torch.arange(int(used.sum()), device=assign.device)
    return rank[assign]


def map_occupancy(assign: Tensor, pos: Tensor, grid: Tensor, cells: tuple[int, int, int], k: int) -> Tensor:
    """The one-hot index map of each cluster pooled to `cells` (t, h, w) bins: [K, P], entry (k, c) = the fraction of
    cell c's tokens in cluster k. assign [M], pos [M, 3], grid (T, H, W)."""
    cells_t = torch.tensor(cells, device=pos.device)
    bins = pos * cells_t // grid  # [M, 3] cell coordinates
    cell = (bins[:, 0] * cells[1] + bins[:, 1]) * cells[2] + bins[:, 2]  # [M]
    P = math.prod(cells)
    per_cell = torch.bincount(cell, minlength=P).float()  # [P] tokens in each cell
    occupancy = torch.zeros(k, P, device=pos.device)
    return occupancy.index_put_((assign, cell), 1.0 / per_cell[cell], accumulate=True)


# ---------------------------------------------------------------------------------------------------------------------
# VQ-Attention


class VQAttention(nn.Module):
    """Eq. 6-7: M~ = MLP(index map), B' = MHA(Q = B W_Q, K = B W_K, V = M~ W_V); returns B + B' (residual) or B'."""

    def __init__(self, config: VQTokenConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.map_mlp = nn.Sequential(
            nn.Linear(math.prod(config.map_grid), config.map_hidden),
            nn.GELU(),
            nn.Linear(config.map_hidden, d),
        )
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.init_parameters()

    def init_parameters(self, init=nn.init) -> None:
        """Normal(0, initializer_range) weights, zero biases; W_O zero in residual mode (an untrained VQ-Attention
        passes the codebook through). `init`: torch.nn.init, or transformers' flag-respecting copy when a host model
        initialises its missing weights (QTSplusForConditionalGeneration._init_weights)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
                if module.bias is not None:
                    init.zeros_(module.bias)
        if self.config.residual:
            init.zeros_(self.o_proj.weight)

    def forward(self, codebook: Tensor, occupancy: Tensor, mask: Tensor) -> Tensor:
        """codebook [B, K, d], occupancy [B, K, P], mask [B, K] -> [B, K, d]."""
        B, K, d = codebook.shape
        h = self.config.num_heads
        m = self.map_mlp(occupancy.to(codebook.dtype))  # M~: [B, K, d]
        q = self.q_proj(codebook).view(B, K, h, d // h).transpose(1, 2)  # [B, h, K, d_h]
        k = self.k_proj(codebook).view(B, K, h, d // h).transpose(1, 2)
        v = self.v_proj(m).view(B, K, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [B, h, K, d_h]
        y = self.o_proj(y.transpose(1, 2).reshape(B, K, d))
        return codebook + y if self.config.residual else y
