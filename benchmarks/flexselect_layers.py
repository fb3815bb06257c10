"""Which layer of a host should FlexSelect score with? Recall@K of needle tokens at every layer (paper Sec. 3.2).

Needle-in-a-haystack clips from a built dataset (qtsplus.selectors.reference_layer): the frames of one video with
`--needle-steps` time steps replaced by frames of another video, asked one of that other video's kept questions
(VSCQ2, the MCQ prompt the evaluation uses). Each layer's FlexSelect scores rank the clip's tokens; Recall@K is the
share of needle tokens among the top K = #needle tokens. The table gives, per layer, the mean over clips and its
ratio to a random ranking (K / M), and the best layer: pass it as `method_options.flexselect.reference_layer` to
evaluate, or `method_options.reference_layer` to train FlexSelect-Lite.

    python -m benchmarks.flexselect_layers                                      # tiny model, smoke data (mechanics)
    python -m benchmarks.flexselect_layers --model Qwen/Qwen2.5-VL-3B-Instruct --data DATA --clips 100 --frames 64

On the tiny random-weight model the numbers mean nothing; on a real host they choose its reference layer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qtsplus.engines import EngineConfig, Prompt
from qtsplus.engines.transformers_engine import TransformersEngine
from qtsplus.prompts import mcq_user_prompt
from qtsplus.selectors import SelectorInput
from qtsplus.selectors.reference_layer import insert_needle, needle_tokens, recall_at_k, scores_by_layer
from qtsplus.shards import load_manifest, read_rows
from qtsplus.video import SamplingConfig, load_video, resolve_video_path
from schemas import VSCQ2Question

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny/qwen2.5-vl", help="the host (hub id, path or tiny/...)")
    parser.add_argument("--data", help="a built dataset (default: build the smoke dataset in a temp folder)")
    parser.add_argument("--clips", type=int, default=8, help="needle clips")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (even)")
    parser.add_argument("--needle-steps", type=int, default=1, help="time steps (2 frames each) of needle")
    parser.add_argument("--max-pixels", type=int, default=360 * 420)
    parser.add_argument("--frames-per-set", type=int, default=32, help="FlexSelect's set size in time steps")
    parser.add_argument("--reduce", choices=["max", "mean"], default="max")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the per-layer results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else build_smoke(Path(tmp))
        rows = run(args, data)
    best = max(rows, key=lambda r: r["recall"])
    print(f"\nRecall@K of needle tokens by reference layer: host {args.model}, {args.clips} clips of {args.frames} "
          f"frames, {args.needle_steps} needle step(s), reduce {args.reduce}")
    print("| layer | recall@K | min | random K/M | x random |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['recall']:.3f} | {r['min']:.3f} | {r['random']:.3f} | {r['lift']:.2f} |")
    print(f"\nbest layer: {best['layer']} (recall@K {best['recall']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def build_smoke(tmp: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), QTSPLUS_NO_PROGRESS="1", PREFECT_LOGGING_LEVEL="ERROR")
    out = tmp / "data"
    subprocess.run([sys.executable, "-m", "qtsplus.cli", "build-dataset", "--out", str(out), "--preset", "smoke",
                    "--no-progress"], env=env, cwd=ROOT, check=True, capture_output=True)
    return out


def run(args: argparse.Namespace, data: Path) -> list[dict]:
    engine = TransformersEngine(EngineConfig(model_id=args.model, batch_size=1, device=args.device, dtype=args.dtype))
    model = engine.model.eval()
    layers = list(range(model.config.text_config.num_hidden_layers))
    manifest = load_manifest(data, "vscq2")
    questions = list(read_rows(data, [f for f in manifest.files if f.split.endswith("_kept")], VSCQ2Question))
    videos = sorted({q.video for q in questions})
    if len(videos) < 2:
        raise SystemExit(f"{data}: needs kept questions about at least two videos")
    root = Path(load_manifest(data, "captions").provenance["video_root"])
    sampling = SamplingConfig(fps=1000.0, min_frames=args.frames, max_frames=args.frames,
                              max_pixels=args.max_pixels, min_pixels=min(4 * 28 * 28, args.max_pixels))
    rng = random.Random(args.seed)
    recalls: dict[int, list[float]] = {layer: [] for layer in layers}
    randoms = []
    for i in range(args.clips):
        question = questions[i % len(questions)]
        haystack = rng.choice([v for v in videos if v != question.video])
        hay, needle = (load_video(resolve_video_path(root, v), sampling) for v in (haystack, question.video))
        steps = len(hay.frames) // 2
        start = rng.randrange(0, steps - args.needle_steps + 1)
        clip = insert_needle(hay, needle, start, args.needle_steps)
        prompt = Prompt(user=mcq_user_prompt(question.question, question.options.model_dump()), video=clip)
        batch = engine.collate([engine.encode(prompt)])
        with torch.no_grad():
            inputs = SelectorInput.from_qwen(model, batch["input_ids"], batch["attention_mask"],
                                             batch["pixel_values_videos"], batch["video_grid_thw"],
                                             batch["second_per_grid_ts"])
        needles = needle_tokens(inputs, start, args.needle_steps)
        scores = scores_by_layer(inputs, layers, args.frames_per_set, args.reduce)
        for layer in layers:
            recalls[layer].append(float(recall_at_k(scores[layer], needles, inputs.x_mask)[0]))
        randoms.append(float(needles.sum() / inputs.x_mask.sum()))
        print(f"clip {i + 1}/{args.clips}: needle {question.video} in {haystack} at step {start}", file=sys.stderr)
    chance = statistics.mean(randoms)
    return [dict(layer=layer, recall=statistics.mean(r), min=min(r), random=chance, lift=statistics.mean(r) / chance)
            for layer, r in recalls.items()]


if __name__ == "__main__":
    main()
