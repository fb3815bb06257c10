"""Prompt rendering and request helpers shared by the transformers and vLLM engines."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qtsplus.engines import Prompt
    from qtsplus.video import VideoClip

VIDEO_PAD = "<|video_pad|>"
# What Qwen2.5-VL's chat template renders for a {"type": "video"} content part; the engine (or vLLM's processor)
# expands the single <|video_pad|> to one token per merged video patch.
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """System (when given) and user turns; a video prompt carries the video placeholder before the user text."""
    messages = [] if prompt.system is None else [{"role": "system", "content": prompt.system}]
    user = prompt.user if prompt.video is None else VIDEO_PLACEHOLDER + prompt.user
    messages.append({"role": "user", "content": user})
    return messages


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The model's own chat template with the assistant turn opened. ``enable_thinking=False`` turns Qwen3's
    reasoning off (its template pre-fills an empty think block); templates that do not know the flag ignore it."""
    return tokenizer.apply_chat_template(
        chat_messages(prompt), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def encode_prompt(tokenizer, prompt: Prompt, video_token_id: int | None, vision_config=None):
    """(token ids, QwenVideoInputs or None) of a rendered chat with the assistant turn opened.

    A video's single <|video_pad|> is expanded to one id per merged video patch; `vision_config` (a Qwen2.5-VL
    vision config) gives the patch sizes. Shared by the transformers engine and the training collator, so a model
    is trained on exactly the token layout it is served with.
    """
    ids = tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=False)
    if prompt.video is None:
        if video_token_id is not None and video_token_id in ids:
            raise ValueError(f"prompt text contains {VIDEO_PAD} but no video was given")
        return ids, None
    if video_token_id is None or vision_config is None:
        raise ValueError("this model is not a video model; it cannot take Prompt.video")
    if ids.count(video_token_id) != 1:
        raise ValueError(f"prompt text must not contain {VIDEO_PAD}: the video is placed by the encoder")
    from qtsplus.video import qwen_video_inputs

    video = qwen_video_inputs(
        prompt.video,
        patch_size=vision_config.patch_size,
        temporal_patch_size=vision_config.temporal_patch_size,
        merge_size=vision_config.spatial_merge_size,
    )
    at = ids.index(video_token_id)
    return ids[:at] + [video_token_id] * video.num_video_tokens + ids[at + 1 :], video


def request_seed(params_seed: int, prompt_seed: int) -> int:
    """A 63-bit seed for one request, a stable function of the run's seed and the prompt's seed (not of batching)."""
    digest = hashlib.sha256(f"qtsplus/{params_seed}/{prompt_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def option_token_ids(tokenizer, options: Sequence[str]) -> list[int]:
    """The token id of each option; each option must be exactly one token and the options distinct."""
    if not options:
        raise ValueError("choose() needs at least one option")
    if len(set(options)) != len(options):
        raise ValueError(f"options must be distinct, got {list(options)}")
    ids = []
    for option in options:
        tokens = tokenizer.encode(option, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(
                f"option {option!r} is {len(tokens)} tokens for this tokenizer; choose() scores single-token options "
                f"(e.g. 'A', 'B', 'C', 'D')"
            )
        ids.append(tokens[0])
    return ids


def sampled_fps(clip: VideoClip) -> float:
    """Frames per second of the sampled clip: its ``sample_fps`` when it carries one, else from its timestamps (the
    native fps for a single frame), as qtsplus.video.qwen_video_inputs does."""
    if getattr(clip, "sample_fps", None):
        return float(clip.sample_fps)
    ts = clip.timestamps
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return float(clip.native_fps)
    return float((len(ts) - 1) / (ts[-1] - ts[0]))
