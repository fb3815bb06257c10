"""Splicing a selection into the host's sequence: plain tensor functions, no transformers.

After selection, each kept (or synthesized) video token replaces the placeholder of the visual token it stands at; the
other video placeholders leave the sequence together with their position ids. Kept video tokens and all text keep the
multimodal rotary position ids (t, h, w) they had in the full sequence (gaps stay where tokens were dropped); the
shortened sequences are left-padded to a common length, and the text row of the position ids (used only for masks) is
renumbered 0..S'-1. `rope_deltas` = max position + 1 - kept length, so decoding continues at the position the unpruned
prompt would have continued from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


@dataclass
class Spliced:
    """The shortened, left-padded sequence the LM sees."""

    inputs_embeds: Tensor  # [B, S', d]
    attention_mask: Tensor  # [B, S'] bool
    position_ids: Tensor  # [4, B, S']: the text row, then the kept tokens' original (t, h, w)
    labels: Tensor | None  # [B, S'] (-100 on padding)
    rope_deltas: Tensor  # [B, 1]


def splice(inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, labels: Tensor | None,
           is_video: Tensor, owner: Tensor, slots: Tensor, sel) -> Spliced:
    """inputs_embeds [B, S, d], position_ids [3, B, S] (t, h, w of the full sequence), attention_mask [B, S],
    labels [B, S] or None, is_video [B, S] (video placeholders), owner [V] and slots [V, M] from `video_slots`, and a
    selection with `tokens` [V, N, d], `indices` [V, N] (ascending, into each video's tokens) and `token_mask`."""
    kept_rows = owner[:, None].expand_as(sel.indices)[sel.token_mask]  # [K]
    kept_cols = slots.gather(1, sel.indices)[sel.token_mask]  # [K]
    kept_tokens = sel.tokens[sel.token_mask].to(inputs_embeds.dtype)  # [K, d]
    inputs_embeds = inputs_embeds.index_put((kept_rows, kept_cols), kept_tokens)
    keep = attention_mask.bool() & ~is_video
    keep[kept_rows, kept_cols] = True

    src, new_mask = left_padded_order(keep)  # [B, S'], [B, S']
    inputs_embeds = inputs_embeds.gather(1, src[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
    mrope = position_ids.gather(2, src[None].expand(3, -1, -1)).masked_fill(~new_mask, 0)  # [3, B, S']
    text_row = (new_mask.cumsum(-1) - 1).masked_fill(~new_mask, 0)  # [B, S'], only used for masks
    if labels is not None:
        labels = labels.gather(1, src).masked_fill(~new_mask, -100)
    rope_deltas = (mrope.amax(dim=(0, 2)) + 1 - new_mask.sum(-1))[:, None]  # [B, 1]
    return Spliced(inputs_embeds, new_mask, torch.cat([text_row[None], mrope]), labels, rope_deltas)


def video_slots(is_video: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Placeholders [B, S] and tokens per video -> owning sample [V], sequence positions [V, M] and their mask."""
    rows, cols = is_video.nonzero(as_tuple=True)  # (batch, sequence) order = the order of the video features
    assert sum(sizes) == rows.numel(), f"{rows.numel()} video placeholders for {sum(sizes)} video tokens"
    owner = torch.stack([r[0] for r in rows.split(sizes)])
    slots = pad_sequence(list(cols.split(sizes)), batch_first=True)
    lengths = torch.tensor(sizes, device=slots.device)
    mask = torch.arange(slots.shape[1], device=slots.device) < lengths[:, None]
    return owner, slots, mask


def gather_rows(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """values [V, S, d], mask [V, S] -> the masked positions of each row, packed and right-padded: [V, L, d], [V, L]."""
    length = mask.sum(-1)
    assert (length > 0).all(), "every sample with a video needs at least one question token"
    packed = pad_sequence(list(values[mask].split(length.tolist())), batch_first=True)
    return packed, torch.arange(packed.shape[1], device=mask.device) < length[:, None]


def left_padded_order(keep: Tensor) -> tuple[Tensor, Tensor]:
    """keep [B, S] -> for each output slot its source position [B, S'] (kept positions in order, left-padded) and
    the output attention mask [B, S'], S' = most kept in a row."""
    count = keep.sum(-1)
    width = int(count.max())
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)  # kept positions first, ascending
    j = torch.arange(width, device=keep.device) - (width - count)[:, None]  # < 0 on the left padding
    return order.gather(1, j.clamp_min(0)), j >= 0
