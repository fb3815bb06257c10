"""EVS (Efficient Video Sampling, arXiv 2510.14624; vLLM `--video-pruning-rate`): drop the visual tokens that repeat
the token at the same place in the previous frame, keep the first frame whole. Training-free and query-agnostic: it
reads the visual tokens and their grid positions only, never the question (`SelectorInput.q`).

Shapes: B videos, M visual tokens (padded, `x_mask`), d hidden size; a frame is a time step t of the LM token grid
(Qwen2.5-VL: one temporal patch = 2 video frames), a place is (h, w) on it.

1. Temporal redundancy: a token at (t, h, w) with a token at (t - 1, h, w) (its predecessor) scores
   s = 1 - cos(x[t, h, w], x[t - 1, h, w]) in [0, 2]: 0 for an exact repeat, higher the more it changed. Tokens
   without a predecessor (the first frame; any place a grid does not hold at t - 1) have nothing to repeat: they
   score 2, the largest dissimilarity, and are ranked before every other token. An exact repeat scores exactly 0
   (not 1 - cos(x, x) with its rounding noise), so repeats tie and go by order.
2. Keep n: every token without a predecessor first, then the others by s, highest first (ties: the earlier token in
   x). When n is smaller than the number of tokens without a predecessor, n of them evenly spaced in x order
   (floor((j + 1/2) K / n) of the K, as `uniform_frames` does inside one frame): spread over the first frame rather
   than its top rows.
3. Output: the kept rows of x, unchanged, at their own slots, in the original order; `scores` = s.

Where this differs from vLLM's `compute_retention_mask` (vllm/multimodal/evs.py) and why:
- Budget. vLLM keeps max(P, int((1 - q) M)) tokens for P tokens per frame and pruning rate q: never fewer than one
  frame, and floor of the ratio. Here n comes from `Budget` (a token count, or ceil(r M) for a ratio r = 1 - q) and
  is kept exactly, also below one frame (step 2's spread), so every method is compared at the same token count.
- First frame. vLLM gives the first frame's tokens dissimilarity 255 and sorts; here they are ranked first by rule and
  their score is 2, so `scores` stays in the range of a cosine dissimilarity.
- Ties. vLLM's stable descending sort keeps the earlier token on ties; so does this (deterministic on any device).
- Layout. vLLM reshapes one video's embeddings to its (T, H, W) grid. Here the predecessor is found from `positions`,
  so padded batches, several videos and grids that are not full rectangles work; padding rows are never scored or
  kept. Scores are computed in float32 whatever the input dtype (bf16 cosines tie too often).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtsplus.selectors.base import PerVideoSelector, register

NO_PREDECESSOR_SCORE = 2.0  # the largest cosine dissimilarity: a token with nothing to repeat


@dataclass
class EVSConfig:
    """EVS has no settings: the budget alone sets how many tokens are kept."""


@register
class EVS(PerVideoSelector):
    """`evs`: drop the tokens most similar to the same place in the previous frame; the first frame is kept first."""

    name = "evs"
    config_class = EVSConfig

    def select_video(self, x: Tensor, positions: Tensor, n: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
        pred = predecessors(positions)  # [m], -1 where none
        s = temporal_dissimilarity(x, pred)  # [m]
        return evs_keep(s, pred < 0, n), s, dict(first_tokens=int((pred < 0).sum()))


def predecessors(positions: Tensor) -> Tensor:
    """positions [m, 3] (t, h, w) of one video's tokens -> [m] long, the row holding (t - 1, h, w), or -1."""
    t, h, w = positions.long().unbind(-1)
    height, width = int(h.max()) + 1, int(w.max()) + 1
    key = (t * height + h) * width + w  # [m] one key per grid place
    assert key.unique().numel() == key.numel(), "two visual tokens of a video share a (t, h, w) position"
    row = torch.full((int(key.max()) + 1,), -1, dtype=torch.long, device=key.device)
    row[key] = torch.arange(key.numel(), device=key.device)
    before = key - height * width  # the key of (t - 1, h, w)
    return torch.where(t > 0, row[before.clamp(min=0)], -1)


def temporal_dissimilarity(x: Tensor, pred: Tensor) -> Tensor:
    """x [m, d], pred [m] -> [m] float32: 1 - cos(x_i, x_pred(i)), clamped to [0, 2] (exactly 0 for an exact repeat,
    so repeats tie and go in x order); 2 where there is no predecessor.

    On a full t-major grid (the predecessor of row i is row i - P) the rows are compared as two views of x, with no
    gathered copy; otherwise the predecessors are gathered."""
    x = x.float()
    rows = (pred >= 0).nonzero()[:, 0]  # rows with a predecessor, ascending
    P = x.shape[0] - rows.numel()
    if P > 0 and rows.numel() and int(rows[0]) == P and bool((pred[rows] == rows - P).all()):
        a, b = x[P:], x[:-P]
    else:
        a, b = x[rows], x[pred[rows]]
    norm = torch.linalg.vector_norm(x, dim=-1)  # [m]
    cos = torch.einsum("md,md->m", a, b) / (norm[rows] * norm[pred[rows]]).clamp(min=1e-8)
    s = torch.full((x.shape[0],), NO_PREDECESSOR_SCORE, device=x.device)
    s[rows] = (1 - cos).clamp(0.0, NO_PREDECESSOR_SCORE)
    near = (s[rows] < 1e-4).nonzero()[:, 0]  # candidates for an exact repeat
    s[rows[near[(a[near] == b[near]).all(-1)]]] = 0.0  # 0, not 0 plus rounding noise
    return s


def evs_keep(s: Tensor, first: Tensor, n: int) -> Tensor:
    """s [m] dissimilarity, first [m] bool (no predecessor), n -> [n] rows to keep: the `first` rows (evenly spaced
    when n is fewer), then the most dissimilar others (ties: the earlier row)."""
    first_rows = first.nonzero()[:, 0]
    k = first_rows.numel()
    if n <= k:
        picks = ((torch.arange(n, device=s.device) + 0.5) * k / n).long()
        return first_rows[picks]
    others = (~first).nonzero()[:, 0]
    order = torch.sort(s[others], descending=True, stable=True).indices  # stable: ties keep x order
    return torch.cat([first_rows, others[order[: n - k]]])
