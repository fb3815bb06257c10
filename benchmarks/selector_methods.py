"""Time and peak memory of every registered selector against M, side by side, at Qwen2.5-VL-3B shapes.

Shapes: d = 2048, 16 query heads, 2 K/V heads, SwiGLU 11008; a prompt of 16 text tokens, the video, and a 32-token
question; the video is a grid of 12 x 16 merged tokens per time step (192 tokens, about a 336 x 448 frame), 2 s per
step, T = M / 192 steps. Every selector gets the same budget (default 10% of M) and runs in inference mode.

- none, uniform_frames, random_tokens: index bookkeeping only.
- evs, vidcom2 (vLLM's training-free pruners): one pass of cosines to the previous frame; channel variances and
  kernel distances to the video and frame centres.
- qtsplus: the QTSplus selector (scoring depth 1, re-encoding depth 1) at the given budget.
- flexselect: the host LM's first `--reference-layer` decoder layers plus the reference layer's q/k, per frame set of
  32 steps. The host is a Qwen2.5-VL text model at 3B shapes holding only layers 0..reference (the ones FlexSelect
  runs) and a small vocabulary (the embedding lookup costs the same); position ids come from transformers'
  get_rope_index. The paper uses layer 20 of the 7B; pass a small layer on the CPU.
- flexselect_lite: a 4-layer ranker at Qwen2-0.5B width (896, 14 heads, 2 K/V heads, FFN 4864) per frame set.
- vqtoken: cosine K-means with K = the budget (3 k-means++ restarts) + VQ-Attention; vqtoken_adaptive: K by the
  elbow rule over 12..32 (21 values of K x 3 restarts).

Each (selector, M) runs in a fresh process: time is the median of `--repeats` forwards after one warm-up; memory is
CUDA max_memory_allocated above what weights and inputs hold, or on the CPU the growth of the process's peak RSS
during the first forward.

    python -m benchmarks.selector_methods                                   # M in {2k, 20k, 180k}, on CUDA if present
    python -m benchmarks.selector_methods --sizes 768 3072 --reference-layer 2 --repeats 1     # small, on a CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLTextConfig

from benchmarks.timing import peak_memory, sync, timed
from qtsplus.selectors import SELECTORS, HostLM, SelectorInput, build_selector

ROOT = Path(__file__).resolve().parents[1]

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 2048, 16, 2, 11008, 36
PREFIX, QUESTION, GRID_H, GRID_W, SECONDS_PER_STEP = 16, 32, 12, 16, 2.0
VIDEO, VISION_START, VISION_END, VOCAB = 1000, 1001, 1002, 1024
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = {name: (name, {}) for name in SELECTORS} | {"vqtoken_adaptive": ("vqtoken", {"mode": "adaptive"})}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 180_000], help="values of M")
    parser.add_argument("--selectors", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget", default="0.1", help="a token count (512) or a ratio of M (0.1, 10%%)")
    parser.add_argument("--reference-layer", type=int, default=20, help="FlexSelect's reference layer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("SELECTOR", "M"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")

    if args.worker is not None:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args)))
        return

    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"Selectors at Qwen2.5-VL-3B shapes: {args.dtype}, {device}, budget {args.budget}, "
          f"FlexSelect reference layer {args.reference_layer}, {GRID_H}x{GRID_W} tokens per time step")  # fmt: skip
    header = f"{'M':>7} {'selector':<17} {'kept':>6} {'ms':>10} {'ms / 1k tok':>12} {'peak MiB':>9} {'peak / |X|':>10}"
    print(header)
    print("-" * len(header), flush=True)
    for m in args.sizes:
        for name in args.selectors:
            cmd = [sys.executable, "-m", "benchmarks.selector_methods", "--worker", name, str(m), f"--budget={args.budget}",
                   f"--reference-layer={args.reference_layer}", f"--device={args.device}", f"--dtype={args.dtype}",
                   f"--repeats={args.repeats}"]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{r['M']:>7} {name:<17} {r['kept']:>6} {r['ms']:>10.1f} {r['ms'] * 1e3 / r['M']:>12.2f} "
                  f"{r['peak_mib']:>9.1f} {r['peak_mib'] / r['x_mib']:>10.2f}", flush=True)  # fmt: skip
        print(flush=True)


def measure(variant: str, m: int, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    name, overrides = VARIANTS[variant]
    with torch.inference_mode():
        host = (
            build_host(args.reference_layer).to(device=device, dtype=dtype) if name == "flexselect" else None
        )
        inputs = make_inputs(m, device, dtype, host)
        if name == "flexselect":
            overrides = {"reference_layer": args.reference_layer}
        text_config = Qwen2_5_VLTextConfig(**host_text_config())
        selector = build_selector(name, text_config, **overrides).to(device=device, dtype=dtype).eval()
        before = peak_memory(device, reset=True)
        kept = int(selector(inputs, args.budget).num_kept[0])
        sync(device)
        peak = peak_memory(device) - before
        seconds = timed(lambda: selector(inputs, args.budget), device, args.repeats)
    m = int(inputs.num_tokens[0])
    return dict(
        M=m, kept=kept, ms=seconds * 1e3, peak_mib=peak / 2**20, x_mib=m * HIDDEN * dtype.itemsize / 2**20
    )


def host_text_config(num_layers: int = LAYERS) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=num_layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128_000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )  # fmt: skip


def build_host(reference_layer: int) -> Qwen2_5_VLModel:
    """Qwen2.5-VL at 3B text shapes with only the layers FlexSelect runs, and a 1-block toy vision tower (unused:
    get_rope_index reads only the vision config's merge size and tokens per second)."""
    config = Qwen2_5_VLConfig(
        text_config=host_text_config(reference_layer + 1),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           spatial_merge_size=2, tokens_per_second=2),
        video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    config.text_config._attn_implementation = "sdpa"
    return Qwen2_5_VLModel(config).eval()


def make_inputs(
    m: int, device: torch.device, dtype: torch.dtype, host: Qwen2_5_VLModel | None
) -> SelectorInput:
    steps = max(1, round(m / (GRID_H * GRID_W)))
    m = steps * GRID_H * GRID_W
    x = torch.randn(1, m, HIDDEN, device=device, dtype=dtype)
    q = torch.randn(1, QUESTION, HIDDEN, device=device, dtype=dtype)
    inputs = SelectorInput.from_grid(x, q, (steps, GRID_H, GRID_W), SECONDS_PER_STEP)
    if host is not None:
        question = torch.randint(0, VIDEO, (QUESTION,))
        ids = torch.cat([torch.randint(0, VIDEO, (PREFIX,)), torch.tensor([VISION_START]),
                         torch.full((m,), VIDEO), torch.tensor([VISION_END]), question])[None].to(device)  # fmt: skip
        grid_thw = torch.tensor([[steps, 2 * GRID_H, 2 * GRID_W]], device=device)  # in 14-px patches
        position_ids, _ = host.get_rope_index(ids, 2 * (ids == VIDEO).int(), None, grid_thw,
                                              torch.tensor([SECONDS_PER_STEP]), None)  # fmt: skip
        text_rows = torch.zeros_like(ids, dtype=torch.bool)
        text_rows[0, -QUESTION:] = True
        slots = (ids[0] == VIDEO).nonzero()[:, 0][None]
        inputs.host = HostLM(host.language_model, ids, torch.ones_like(ids), position_ids, slots, text_rows)
    return inputs


if __name__ == "__main__":
    main()
