"""Fig. 4 of the paper: visual tokens into the LM and time to the full answer against frame count, with and without
QTSplus, on a Qwen2.5-VL with random weights (shapes matter, values do not).

    python -m benchmarks.e2e_latency                                   # tiny shapes, CPU-sized videos
    python -m benchmarks.e2e_latency --shapes 3b --frames 50 100 200 300 400 500 600 --height 480 --width 854

Each row: the same synthetic video (random pixels, --height x --width) sampled to F frames, one MCQ prompt, greedy
generation of --new-tokens tokens; "full" = the selector switched off (the unpruned model), "qtsplus" = the selector
on (its rho is an untrained prediction, so the kept fraction sits near the middle of [rho_min, rho_max]; pass
--rho to pin it and compare at a chosen budget). Times include the vision tower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from qtsplus.engines import Prompt
from qtsplus.engines.chat import encode_prompt
from qtsplus.host.model import QTSplusForConditionalGeneration
from qtsplus.prompts import mcq_user_prompt
from qtsplus.tiny import tiny_model_path
from qtsplus.video import VideoClip, smart_resize

QWEN25_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]})
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           fullatt_block_indexes=[7, 15, 23, 31], window_size=112)


def build(shapes: str, device: torch.device, dtype: torch.dtype, rho: float | None):
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = tiny_model_path("qwen2.5-vl")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    if shapes == "3b":
        for k, v in QWEN25_VL_3B_TEXT.items():
            setattr(config.text_config, k, v)
        config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = True  # as the 3B checkpoint
        for k, v in QWEN25_VL_3B_VISION.items():
            setattr(config.vision_config, k, v)
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    selector = {"n_max": 10**6}
    if rho is not None:
        selector |= {"rho_min": rho, "rho_max": rho}
    with torch.device(device):
        model = QTSplusForConditionalGeneration.from_qwen(base, **selector).eval()
    del base
    return model, tokenizer


def synthetic_clip(frames: int, height: int, width: int, max_pixels: int) -> VideoClip:
    h, w = smart_resize(height, width, factor=28, min_pixels=28 * 28, max_pixels=max_pixels)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(frames, h, w, 3), dtype=np.uint8)
    return VideoClip(frames=pixels, timestamps=np.arange(frames, dtype=np.float64), native_fps=1.0,
                     source="synthetic", sample_fps=1.0)


def measure(model, tokenizer, clip: VideoClip, selection: bool, new_tokens: int, device) -> dict:
    prompt = Prompt(user=mcq_user_prompt("What happens first in the video?",
                                         {"A": "a man rides", "B": "a car stops", "C": "a dog runs", "D": "rain"}),
                    video=clip)
    ids, video = encode_prompt(tokenizer, prompt, model.config.video_token_id, model.config.vision_config)
    batch = {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), device=device,
                                                                                          dtype=torch.long),
             "pixel_values_videos": video.pixel_values_videos.to(device, model.dtype),
             "video_grid_thw": video.video_grid_thw.to(device),
             "second_per_grid_ts": torch.tensor([video.second_per_grid_t], device=device)}
    model.selection = selection
    model.last_prefill = None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        seconds = time.perf_counter() - t0
    tokens_in = video.num_video_tokens
    kept = model.last_prefill["video_tokens_kept"][0] if selection and model.last_prefill else tokens_in
    return {"tokens_in": tokens_in, "kept": kept, "seconds": seconds}


def median_run(model, tokenizer, clip, selection: bool, new_tokens: int, device, repeats: int) -> dict:
    runs = [measure(model, tokenizer, clip, selection, new_tokens, device) for _ in range(repeats)]
    return runs[0] | {"seconds": statistics.median(r["seconds"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--height", type=int, default=112)
    parser.add_argument("--width", type=int, default=168)
    parser.add_argument("--max-pixels", type=int, default=480 * 854)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rho", type=float, default=None, help="pin QTSplus's retention fraction")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs per cell")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model, tokenizer = build(args.shapes, device, dtype, args.rho)
    warm = synthetic_clip(args.frames[0], args.height, args.width, args.max_pixels)
    for selection in (False, True):
        measure(model, tokenizer, warm, selection, 2, device)  # warm-up
    print(f"\nend-to-end latency, {args.shapes} shapes, {args.height}x{args.width} video, {args.new_tokens} new tokens, "
          f"{device.type} {dtype}")
    print(f"{'frames':>6} {'tokens full':>12} {'kept':>8} {'tokens -%':>10} {'full s':>8} {'qtsplus s':>10} {'latency -%':>11}")
    for n in args.frames:
        clip = synthetic_clip(n, args.height, args.width, args.max_pixels)
        full = median_run(model, tokenizer, clip, False, args.new_tokens, device, args.repeats)
        qts = median_run(model, tokenizer, clip, True, args.new_tokens, device, args.repeats)
        print(f"{n:>6} {full['tokens_in']:>12} {qts['kept']:>8} {1 - qts['kept'] / full['tokens_in']:>10.1%} "
              f"{full['seconds']:>8.3f} {qts['seconds']:>10.3f} {1 - qts['seconds'] / full['seconds']:>11.1%}",
              flush=True)


if __name__ == "__main__":
    main()
