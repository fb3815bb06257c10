"""A tiny random-weight Qwen2.5-VL for the selector tests (no downloads), and prompts with a video placeholder."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VOCAB = 128
IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
EOS = 124


def tiny_config(**overrides) -> Qwen2_5_VLConfig:
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        spatial_merge_size=2,
        patch_size=14,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        **overrides,
    )


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
