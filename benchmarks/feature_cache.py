"""Training steps per second with and without the vision feature cache, and what the cache costs on disk.

    python -m benchmarks.feature_cache                               # tiny shapes on the CPU (smoke sampling)
    python -m benchmarks.feature_cache --shapes 3b --frames 40       # Qwen2.5-VL-3B shapes (random weights), a GPU

Builds the smoke dataset (shipped videos, tiny models) unless --data is given, caches the features of its videos with
the benchmark model's own vision tower (`build_feature_set`, in process), then times training steps of the `selector`
variant on the same stream of micro-batches in two modes: "videos" (decode, pack pixels, run the vision tower: what
training does without a cache) and "cache" (read and verify the stored features, `video_embeds`). A step is the
collator + forward + backward + AdamW step on the trainable (selector) parameters, in process (no DeepSpeed: its
per-step overhead is the same in both modes). Both modes start every block from the same weights, alternate in blocks
(so load from other processes hits both alike), and skip warm-up steps. 3b shapes build Qwen2.5-VL-3B's vision tower
and LM with random weights (as benchmarks/e2e_latency.py) and scale every frame to --pixels (default 360x420, the
paper's budget), since the shipped example videos are small.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def build_data(tmp: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=f"{tmp}/home", QTSPLUS_NO_PROGRESS="1", PREFECT_LOGGING_LEVEL="ERROR")
    data = f"{tmp}/data"
    subprocess.run([sys.executable, "-m", "qtsplus.cli", "build-dataset", "--out", data, "--preset", "smoke",
                    "--no-progress"], env=env, cwd=REPO, check=True, capture_output=True)
    return data


def build_model(shapes: str, device: torch.device, dtype: torch.dtype):
    from qtsplus.training.config import TrainConfig
    from qtsplus.training.model import build_model as build_training_model

    if shapes == "tiny":
        torch.manual_seed(0)
        model, tokenizer = build_training_model(TrainConfig.preset("smoke", data="unused", out="unused"))
        model.to(device=device, dtype=dtype)
    else:
        from benchmarks.e2e_latency import build

        model, tokenizer = build(shapes, device, dtype, rho=None)
        model.freeze_base(train_lm=False)
    model.train()
    return model, tokenizer


def run_steps(model, collator, examples, optimizer, steps: int, device, dtype, start: int) -> list[float]:
    """Wall seconds of `steps` training steps (collate + forward + backward + optimizer step)."""
    from qtsplus.training.loop import gate_generator

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for step in range(start, start + steps):
        sync()
        t0 = time.perf_counter()
        batch = collator(next(examples))
        batch = {k: v.to(device) for k, v in batch.items()}
        for key in ("pixel_values_videos", "video_embeds"):
            if key in batch:
                batch[key] = batch[key].to(dtype)
        out = model(**batch, generator=gate_generator(0, step, 0, 0))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a built dataset (default: build the smoke dataset in a temp folder)")
    parser.add_argument("--shapes", choices=["tiny", "3b"], default="tiny")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: the smoke sampling)")
    parser.add_argument("--pixels", type=int, default=None, help="pixels per frame (default: smoke's for tiny, "
                                                                 "360x420 scaled up to for 3b)")
    parser.add_argument("--batch", type=int, default=None, help="micro batch (default: 2 tiny, 1 3b)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per mode")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per block")
    parser.add_argument("--storage", choices=["fp32", "bf16", "fp16", "fp8"], default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from qtsplus.features.cache import VisionTower, build_feature_set
    from qtsplus.features.config import FeatureConfig
    from qtsplus.features.store import DTYPE_NAMES, FeatureSpec, FeatureStore, vision_fingerprint
    from qtsplus.training.config import TrainConfig
    from qtsplus.training.data import Collator, default_video_root, example_stream
    from qtsplus.video import SamplingConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (2 if args.shapes == "tiny" else 1)
    smoke = TrainConfig.preset("smoke", data="unused", out="unused").video
    pixels = args.pixels or (smoke.max_pixels if args.shapes == "tiny" else 360 * 420)
    sampling = SamplingConfig(fps=smoke.fps, min_frames=args.frames or smoke.min_frames,
                              max_frames=args.frames or smoke.max_frames, min_pixels=pixels if args.shapes == "3b"
                              else smoke.min_pixels, max_pixels=pixels)
    if args.frames:  # exactly this many frames from every video (the shipped ones have 75 to 150)
        sampling = SamplingConfig(fps=1000.0, min_frames=args.frames, max_frames=args.frames,
                                  min_pixels=sampling.min_pixels, max_pixels=sampling.max_pixels)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or build_data(tmp)
        model, tokenizer = build_model(args.shapes, device, dtype)
        visual = model.model.visual
        vc = model.config.vision_config
        spec = FeatureSpec(model_id=f"benchmark/{args.shapes}-random", revision="seed0", video=sampling,
                           compute_dtype=DTYPE_NAMES[dtype], storage_dtype=args.storage, hidden_size=vc.out_hidden_size,
                           patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                           merge_size=vc.spatial_merge_size)
        fcfg = FeatureConfig(data=data, out=f"{tmp}/store", model_id=spec.model_id, video=sampling,
                             storage_dtype=args.storage, device=str(device))
        t0 = time.perf_counter()
        manifest = build_feature_set(fcfg, spec, VisionTower(visual, vision_fingerprint(visual), device))
        cache_seconds = time.perf_counter() - t0
        features = FeatureStore(f"{tmp}/store").find(sampling, vision_sha256=vision_fingerprint(visual))
        assert features is not None, "the benchmark's own feature set was not found"

        cfg = TrainConfig.preset("smoke", data=data, out="unused", micro_batch_size=batch)
        root = default_video_root(Path(data))
        collators = {"videos": Collator(tokenizer, model.config, root, sampling),
                     "cache": Collator(tokenizer, model.config, root, sampling, features)}
        stream = itertools.cycle([ex for _, ex in itertools.islice(example_stream(cfg), 64)])
        chunks = iter(lambda: list(itertools.islice(stream, batch)), [])
        initial = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("selector.")}
        trainable = [p for p in model.parameters() if p.requires_grad]
        per_block = max(1, args.steps // args.blocks)
        timings: dict[str, list[float]] = {"videos": [], "cache": []}
        for _ in range(args.blocks):
            for mode, collator in collators.items():
                model.load_state_dict(initial, strict=False)  # every block starts from the same weights
                optimizer = torch.optim.AdamW(trainable, lr=1e-4)
                run_steps(model, collator, chunks, optimizer, args.warmup, device, dtype, 0)
                timings[mode] += run_steps(model, collator, chunks, optimizer, per_block, device, dtype,
                                           args.warmup)
        assert features.hits > 0 and features.rejected == 0

    raw = manifest.bytes / max(1, len(manifest.videos))
    per_token = spec.bytes_per_token()
    mean_tokens = sum(e.num_tokens for e in manifest.videos.values()) / max(1, len(manifest.videos))
    rate = {m: len(t) / sum(t) for m, t in timings.items()}
    print(f"\nfeature cache, {args.shapes} shapes, {device.type} {DTYPE_NAMES[dtype]}, micro batch {batch}, "
          f"{sampling.max_frames} frames of <= {sampling.max_pixels} px, {mean_tokens:.0f} vision tokens/video, "
          f"storage {args.storage}")
    print(f"{'mode':<8} {'steps/s':>9} {'median step ms':>15} {'steps':>6}")
    for mode in ("videos", "cache"):
        print(f"{mode:<8} {rate[mode]:>9.2f} {statistics.median(timings[mode]) * 1e3:>15.1f} {len(timings[mode]):>6}")
    print(f"{'ratio':<8} {rate['cache'] / rate['videos']:>8.2f}x")
    print(f"disk: {raw / 1024:,.1f} KiB per video ({mean_tokens:.0f} tokens x {per_token} B; shards incl. metadata), "
          f"{len(manifest.videos)} videos cached in {cache_seconds:.1f} s ({cache_seconds / len(manifest.videos):.2f} "
          f"s per video, once)")


if __name__ == "__main__":
    main()
