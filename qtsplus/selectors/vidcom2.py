"""VidCom2 (Video Compression Commander, arXiv 2505.14454; vLLM `--video-retention-ratio`): per-frame budgets from
how distinctive each frame is, then, in each frame, the tokens least like the video and the frame. Training-free and
query-agnostic: it reads the visual tokens and their frames only, never the question (`SelectorInput.q`).

Shapes: B videos, M visual tokens (padded, `x_mask`), d hidden size; a frame is a time step t of the LM token grid
(Qwen2.5-VL: one temporal patch = 2 video frames), T frames with P_t tokens each, m = sum P_t real tokens.

1. Features (the reference implementation's choice, kept by vLLM): the c = channel_ratio d channels whose variance
   over the video's tokens is lowest (ties: the lower channel), each token's c-vector L2-normalised: f_i.
2. Centres: the video centre g = mean_i f_i and each frame's centre g_t = mean of its f_i.
3. Redundancy of token i of frame t: r_i = K(f_i, g) + K(f_i, g_t) with the multi-scale Gaussian kernel
   K(a, b) = sum_alpha exp(-|a - b|^2 / (2 alpha)), alpha in `alphas` (1/8 .. 2). Uniqueness (`scores`) = -r_i.
4. Frame distinctiveness (Frame Compression Adjustment): u_t = -mean_{i in t} K(f_i, g) (a frame far from the
   video's centre is distinctive), p = softmax(u / temperature), weight w_t = 1 + p_t - 1/T (1/T = the mean of p).
5. Frame budgets: real quotas k_t = clamp(lambda w_t P_t, lo_t, P_t) with lambda chosen so they sum to n exactly
   (lo_t = min_tokens_per_frame when the budget allows it for every frame, else 0); integers by largest remainder
   (ties: the larger weight, then the earlier frame). With equal frames and no clamp lambda = n / m, i.e. vLLM's
   ratio (1 - q) (1 + p_t - mean p) P.
6. Adaptive Token Compression: in each frame its k_t most unique tokens (ties: the earlier token); output the kept
   rows of x, unchanged, at their own slots, in the original order.

Where this differs from vLLM's `compute_retention_mask` (vllm/multimodal/video_prune/vidcom2.py) and why:
- Budget. vLLM keeps max(T, int((1 - q) M)) tokens: round each frame's quota, floor it at one token, then add or drop
  tokens across the whole video by score until the count is right (which may empty a frame or overfill another).
  Here n comes from `Budget` (a token count, or ceil(r M) for a ratio) and is met by the frame budgets themselves
  (step 5: rescaled quotas, largest remainder), so every frame gets what its distinctiveness gives it and every
  method is compared at the same token count; below one token per frame (n < T) no frame is floored.
- Ties are broken by position (channels, tokens, frames), not left to `topk`, so the result is deterministic.
- Batches: one video at a time over its real rows (padding rows are never scored or kept); frames may hold different
  token counts. Computed in float32 whatever the input dtype; squared distances to the centres as
  |f|^2 - 2 f.g + |g|^2 (no [m, c] difference per centre; the same up to rounding, clamped at 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qtsplus.selectors.base import PerVideoSelector, register


@dataclass
class VidCom2Config:
    channel_ratio: float = 0.5  # share of the hidden channels scored: the lowest-variance ones
    alphas: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)  # bandwidths of the multi-scale Gaussian kernel
    temperature: float = 0.01  # of the softmax over frame distinctiveness (lower: budgets follow it more sharply)
    min_tokens_per_frame: int = 1  # floor of every frame's budget when n allows it for all frames

    def __post_init__(self) -> None:
        assert 0.0 < self.channel_ratio <= 1.0 and self.temperature > 0 and self.min_tokens_per_frame >= 0
        assert self.alphas and all(a > 0 for a in self.alphas)


@register
class VidCom2(PerVideoSelector):
    """`vidcom2`: distinctive frames get more of the budget; each frame keeps its most unique tokens."""

    name = "vidcom2"
    config_class = VidCom2Config

    def select_video(self, x: Tensor, positions: Tensor, n: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        frame = torch.unique(positions[:, 0], return_inverse=True)[1]  # [m] frame of each token
        uniqueness, frame_share = self.score(x, frame)  # [m], [T]
        sizes = torch.bincount(frame)  # [T]
        weight = 1 + frame_share - 1 / len(sizes)  # 1 + p_t - mean(p)
        budget = frame_budgets(n, weight, sizes, self.config.min_tokens_per_frame)  # [T]
        kept = top_per_frame(uniqueness, frame, budget)
        return kept, uniqueness, dict(frame_share=frame_share.tolist(), frame_budget=budget.tolist())

    def score(self, x: Tensor, frame: Tensor) -> tuple[Tensor, Tensor]:
        """x [m, d] one video's tokens, frame [m] their frame (0..T-1) -> uniqueness [m] (higher = less like its video
        and frame), frame_share p [T] (softmax of the frames' distinctiveness)."""
        x = x.float()
        c = max(1, int(x.shape[-1] * self.config.channel_ratio))
        channels = torch.sort(x.var(0, unbiased=False), stable=True).indices[:c]  # the c lowest-variance channels
        f = F.normalize(x[:, channels], dim=-1)  # [m, c]
        sizes = torch.bincount(frame)[:, None]  # [T, 1]
        frame_centre = torch.zeros(len(sizes), c, device=x.device).index_add_(0, frame, f) / sizes  # [T, c]
        video_centre = f.mean(0)  # [c]
        # |f - g|^2 = |f|^2 - 2 f.g + |g|^2, without an [m, c] difference per centre
        f_sq = torch.einsum("mc,mc->m", f, f)
        to_video = self.kernel(f_sq - 2 * f @ video_centre + video_centre.square().sum())  # [m]
        g_sq = frame_centre.square().sum(-1)  # [T]
        to_frame = self.kernel(f_sq - 2 * torch.einsum("mc,mc->m", f, frame_centre[frame]) + g_sq[frame])  # [m]
        distinct = -torch.zeros(len(sizes), device=x.device).index_add_(0, frame, to_video) / sizes[:, 0]  # [T]
        return -(to_video + to_frame), torch.softmax(distinct / self.config.temperature, 0)

    def kernel(self, dist: Tensor) -> Tensor:
        """Squared distances [m] -> [m]: the sum over the bandwidths of exp(-dist / (2 alpha))."""
        dist = dist.clamp(min=0.0)  # rounding can take |f - g|^2 of a token at its centre just below 0
        return sum(torch.exp(-dist / (2 * alpha)) for alpha in self.config.alphas)


def frame_budgets(n: int, weight: Tensor, sizes: Tensor, min_per_frame: int = 1) -> Tensor:
    """n tokens over T frames of `sizes` [T] in proportion to weight [T] x size: integers k [T] summing to n with
    lo_t <= k_t <= sizes_t, lo_t = min(min_per_frame, size_t) if those floors fit in n (else 0).

    Real quotas clamp(lambda weight_t size_t, lo_t, size_t), lambda by bisection so they sum to n; then floors, and
    the rest one by one to the largest fractional parts (ties: larger weight, then earlier frame)."""
    sizes = sizes.long().cpu()
    assert 1 <= n <= int(sizes.sum()) and bool((weight > 0).all())
    hi = sizes.double()
    lo = torch.clamp(torch.full_like(hi, min_per_frame), max=hi)
    lo = lo if lo.sum() <= n else torch.zeros_like(hi)
    w = weight.double().cpu() * hi

    def quotas(lam: float) -> Tensor:
        return torch.minimum(torch.maximum(lam * w, lo), hi)

    low, high = 0.0, float((hi / w).max())  # all at lo ... all at their size
    for _ in range(100):  # past float64 precision
        mid = (low + high) / 2
        low, high = (mid, high) if quotas(mid).sum() < n else (low, mid)
    quota = quotas(high)
    k = torch.floor(quota + 1e-9).clamp(max=hi).long()
    left = n - int(k.sum())
    frac = (quota - k).tolist()
    order = sorted(range(len(k)), key=lambda t: (-frac[t], -float(w[t]), t))
    room = [t for t in order if k[t] < sizes[t]]
    assert 0 <= left <= len(room), f"frame budgets missed n={n} by {left}"
    k[room[:left]] += 1
    return k.to(weight.device)


def top_per_frame(score: Tensor, frame: Tensor, budget: Tensor) -> Tensor:
    """score [m], frame [m] in 0..T-1, budget [T] -> rows [sum budget]: the budget[t] highest-scored rows of each frame
    (ties: the earlier row)."""
    order = torch.sort(score, descending=True, stable=True).indices  # best first, ties in x order
    order = order[torch.sort(frame[order], stable=True).indices]  # grouped by frame, best first inside each
    counts = torch.bincount(frame, minlength=len(budget))
    starts = torch.cumsum(counts, 0) - counts  # where each frame's group begins in `order`
    rank = torch.arange(len(order), device=score.device) - starts[frame[order]]  # rank inside its frame
    return order[rank < budget[frame[order]]]
