"""Choosing FlexSelect's reference layer for a host (paper Sec. 3.2): Recall@K of needle tokens at every layer.

A needle-in-a-haystack clip is the frames of one video (the haystack) with a few consecutive time steps replaced by
frames of another video (the needle), asked a question about the needle video. The visual tokens of those time steps
are the needles. A layer is a good reference when the text after the video attends to them: Recall@K = the fraction
of needle tokens among the layer's K top-scored tokens, K = the number of needle tokens (a random ranking gives about
K / M). Scores are FlexSelect's (frame sets, the model's own rotary positions, max over heads and text rows), taken at
every layer in one pass per frame set. `python -m benchmarks.flexselect_layers` runs it over a built dataset.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qtsplus.selectors.base import SelectorInput
from qtsplus.selectors.flexselect import FlexSelect, FlexSelectConfig
from qtsplus.video import VideoClip


@torch.no_grad()
def scores_by_layer(
    inputs: SelectorInput, layers: list[int], frames_per_set: int = 32, reduce: str = "max"
) -> dict[int, Tensor]:
    """FlexSelect's scores [B, M] (0 at padding) with each of `layers` as the reference layer; inputs need `host`."""
    assert inputs.host is not None, "scoring with the host's layers needs SelectorInput.host"
    flex = FlexSelect(FlexSelectConfig(reference_layer=max(layers), frames_per_set=frames_per_set, reduce=reduce))
    out = {layer: torch.zeros(inputs.x_mask.shape, device=inputs.x.device) for layer in layers}
    for b in range(inputs.x.shape[0]):
        for tokens in flex.sets(inputs, b):
            for layer, scores in flex.score_set_at_layers(inputs, b, tokens, layers).items():
                out[layer][b, tokens] = scores
    return out


def recall_at_k(scores: Tensor, needles: Tensor, x_mask: Tensor) -> Tensor:
    """[B] fraction of each video's needle tokens among its K top-scored real tokens, K = its needle count.
    scores, needles (bool), x_mask: [B, M]."""
    recalls = []
    for b in range(scores.shape[0]):
        k = int(needles[b].sum())
        assert k > 0, "a video without needles"
        top = scores[b].float().masked_fill(~x_mask[b], -torch.inf).topk(k).indices
        recalls.append(needles[b, top].float().mean())
    return torch.stack(recalls)


def insert_needle(haystack: VideoClip, needle: VideoClip, start_step: int, steps: int) -> VideoClip:
    """The haystack with time steps [start_step, start_step + steps) (2 frames each, Qwen2.5-VL's temporal patch)
    replaced by 2 * steps frames of the needle, evenly spaced over it and resized to the haystack's frame size.
    Timestamps stay the haystack's."""
    frames = haystack.frames.copy()  # [T, H, W, 3]
    first, count = 2 * start_step, 2 * steps
    if start_step < 0 or first + count > len(frames):
        raise ValueError(f"needle steps [{start_step}, {start_step + steps}) outside the haystack's "
                         f"{len(frames) // 2} time steps")
    pick = np.linspace(0, len(needle.frames) - 1, count).round().astype(int)
    picked = torch.from_numpy(needle.frames[pick]).permute(0, 3, 1, 2).float()  # [count, 3, h, w]
    resized = F.interpolate(picked, size=frames.shape[1:3], mode="bilinear", align_corners=False)
    frames[first : first + count] = resized.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return dataclasses.replace(haystack, frames=frames, source=f"{haystack.source}+needle:{needle.source}")


def needle_tokens(inputs: SelectorInput, start_step: int, steps: int) -> Tensor:
    """[B, M] bool: the real tokens in time steps [start_step, start_step + steps)."""
    t = inputs.positions[..., 0]
    return (t >= start_step) & (t < start_step + steps) & inputs.x_mask
