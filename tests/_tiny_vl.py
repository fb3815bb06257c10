"""The tiny random-weight Qwen2.5-VL of qtsplus.tiny on a 128-token vocabulary (no tokenizer, no downloads) for the
selector tests, and prompts with a video placeholder."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qtsplus.tiny import vl_config

VOCAB = 128
IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
EOS = 124


def tiny_config(**overrides) -> Qwen2_5_VLConfig:
    """The library's tiny Qwen2.5-VL (qtsplus.tiny) on this module's small vocabulary, without its tokenizer."""
    return vl_config(vocab_size=VOCAB, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                     vision_end_token_id=VISION_END, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=0, **overrides)


def tiny_qwen(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()


def video_prompt(num_video_tokens: int, question: list[int], prefix: tuple[int, ...] = (1, 2)) -> list[int]:
    """prefix <vision_start> <video>*n <vision_end> question"""
    return [*prefix, VISION_START, *[VIDEO] * num_video_tokens, VISION_END, *question]


def random_video(t: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """pixel_values_videos [t*h*w, 3*2*14*14], video_grid_thw [1, 3] (in 14-px patches), #LM tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g), torch.tensor([[t, h, w]]), t * h * w // 4
