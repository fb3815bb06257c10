"""Comparators behind the selector contract: keep everything, keep evenly spaced whole frames, keep random tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qtsplus.selectors.base import Selection, Selector, SelectorInput, register, selection_from_keep


@dataclass
class KeepAllConfig:
    pass


@register
class KeepAll(Selector):
    """`none`: every visual token reaches the LM (the unpruned host); the budget is ignored."""

    name = "none"
    config_class = KeepAllConfig
    budgeted = False
    fills_budget = False

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        return selection_from_keep(inputs, inputs.x_mask, n)


@dataclass
class UniformFramesConfig:
    pass


@register
class UniformFrames(Selector):
    """`uniform_frames`: whole frames (time steps of the token grid), f = n // P of them for P tokens per frame,
    evenly spaced: frame floor((j + 1/2) T / f) for j < f. When n < P, one frame (the middle one) with n of its
    tokens, evenly spaced in raster order. Keeps at most n tokens, usually fewer (whole frames)."""

    name = "uniform_frames"
    config_class = UniformFramesConfig
    fills_budget = False

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        keep = torch.zeros_like(inputs.x_mask)
        for b in range(keep.shape[0]):
            real = inputs.x_mask[b]
            t = inputs.positions[b, :, 0].masked_fill(~real, -1)  # [M]
            num_frames = int(t.max()) + 1
            per_frame = int(real.sum()) // num_frames
            f = int(n[b]) // per_frame
            if f >= 1:
                frames = ((torch.arange(f, device=t.device) + 0.5) * num_frames / f).long()
                keep[b] = torch.isin(t, frames)
            else:
                members = (t == num_frames // 2).nonzero()[:, 0]  # [P], raster order
                picks = ((torch.arange(int(n[b]), device=t.device) + 0.5) * per_frame / int(n[b])).long()
                keep[b, members[picks]] = True
        return selection_from_keep(inputs, keep, n)


@dataclass
class RandomTokensConfig:
    seed: int = 0  # used when no generator is passed: the same input always keeps the same tokens


@register
class RandomTokens(Selector):
    """`random_tokens`: n tokens drawn uniformly without replacement, kept in their original order."""

    name = "random_tokens"
    config_class = RandomTokensConfig

    def select(self, inputs: SelectorInput, n: Tensor, generator: torch.Generator | None) -> Selection:
        generator = generator or torch.Generator().manual_seed(self.config.seed)
        keep = torch.zeros_like(inputs.x_mask)
        for b in range(keep.shape[0]):
            real = inputs.x_mask[b].nonzero()[:, 0]  # [M_b]
            drawn = torch.randperm(real.numel(), generator=generator, device=generator.device)[: int(n[b])]
            keep[b, real[drawn.to(real.device)]] = True
        return selection_from_keep(inputs, keep, n)
