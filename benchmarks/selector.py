"""Forward time and peak memory of the QTSplus selector against M, at Qwen2.5-VL-3B shapes.

Shapes: d = 2048, 16 query heads, 2 K/V heads, SwiGLU 11008, 32 question tokens, scoring depth 1, re-encoding depth 1,
rho fixed at 0.11 (about the paper's Fig. 4 operating point: ~180k visual tokens -> ~20k kept), n_max = M.

For each M the selector runs in inference mode (hard top-n) in a fresh process, so that peak memory is that of one
forward: on CUDA, max_memory_allocated above what the weights and inputs already hold; on CPU, the growth of the
process's peak RSS during the first forward. The reference is one LM prefill over the n kept tokens: one
Qwen2_5_VLDecoderLayer at the 3B shapes (SDPA, causal), timed and multiplied by the 36 layers (embedding, final norm
and LM head are left out, which flatters the selector's share a little).

    python -m benchmarks.selector                              # M in {2k, 20k, 180k}
    python -m benchmarks.selector --sizes 2000 20000 --device cpu --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRotaryEmbedding,
)

from benchmarks.timing import peak_memory, sync, timed
from qtsplus.selectors.qtsplus import QTSplusSelector, SelectorConfig

ROOT = Path(__file__).resolve().parents[1]

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, QUESTION = 2048, 16, 2, 11008, 36, 32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 180_000], help="values of M")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--rho", type=float, default=0.11, help="fixed retention fraction (rho_min = rho_max)"
    )
    parser.add_argument("--scoring-depth", type=int, default=1)
    parser.add_argument("--reencoder-depth", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")

    if args.worker is not None:
        print(json.dumps(measure(args.worker, args)))
        return

    print_header(args)
    for m in args.sizes:
        cmd = [sys.executable, "-m", "benchmarks.selector", "--worker", str(m)] + [
            f"--device={args.device}", f"--dtype={args.dtype}", f"--rho={args.rho}", f"--repeats={args.repeats}",
            f"--scoring-depth={args.scoring_depth}", f"--reencoder-depth={args.reencoder_depth}",
        ]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        print_row(json.loads(out.strip().splitlines()[-1]))


def measure(m: int, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with torch.inference_mode():
        n, selector_s, peak = measure_selector(m, device, dtype, args)
        layer_s = prefill_layer_seconds(n, device, dtype, args.repeats)
    return dict(
        M=m,
        n=n,
        selector_ms=selector_s * 1e3,
        peak_mib=peak / 2**20,
        x_mib=m * HIDDEN * dtype.itemsize / 2**20,
        prefill_ms=layer_s * LAYERS * 1e3,
    )


def measure_selector(m: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace):
    """(kept tokens, median forward seconds, peak bytes of the first forward above weights + inputs)."""
    torch.manual_seed(0)
    config = SelectorConfig(
        hidden_size=HIDDEN,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        intermediate_size=FFN,
        scoring_depth=args.scoring_depth,
        reencoder_depth=args.reencoder_depth,
        rho_min=args.rho,
        rho_max=args.rho,
        n_max=m,
    )
    selector = QTSplusSelector(config).to(device=device, dtype=dtype).eval()
    x = torch.randn(1, m, HIDDEN, device=device, dtype=dtype)
    q = torch.randn(1, QUESTION, HIDDEN, device=device, dtype=dtype)
    times = torch.arange(m, device=device, dtype=torch.float32)[None] / 100
    peak_before = peak_memory(device, reset=True)
    n = int(selector(x, q, times).num_kept[0])
    sync(device)
    peak = peak_memory(device) - peak_before
    return n, timed(lambda: selector(x, q, times), device, args.repeats), peak


def prefill_layer_seconds(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """One Qwen2.5-VL-3B decoder layer over n tokens (causal SDPA, 3-D rotary), as in the LM's prefill."""
    text = Qwen2_5_VLTextConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=151_936, max_position_embeddings=128_000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )  # fmt: skip
    text._attn_implementation = "sdpa"
    layer = Qwen2_5_VLDecoderLayer(text, layer_idx=0).to(device=device, dtype=dtype).eval()
    h = torch.randn(1, n, HIDDEN, device=device, dtype=dtype)
    positions = torch.arange(n, device=device).view(1, 1, n).expand(3, 1, n)
    rope = Qwen2_5_VLRotaryEmbedding(text).to(device)(h, positions)
    return timed(lambda: layer(h, attention_mask=None, position_embeddings=rope), device, repeats)


def print_header(args: argparse.Namespace) -> None:
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"QTSplus selector at Qwen2.5-VL-3B shapes: {args.dtype}, {device}, rho={args.rho}, L={QUESTION}, "
          f"scoring depth {args.scoring_depth}, re-encoding depth {args.reencoder_depth}")  # fmt: skip
    header = (
        f"{'M':>8} {'n kept':>7} {'selector ms':>12} {'ms / 1k tok':>12} {'peak MiB':>9} {'peak / |X|':>10} "
        f"{'LM prefill ms':>14} {'selector share':>15}"
    )
    print(header)
    print("-" * len(header), flush=True)


def print_row(r: dict) -> None:
    share = r["selector_ms"] / r["prefill_ms"]
    print(
        f"{r['M']:>8} {r['n']:>7} {r['selector_ms']:>12.1f} {r['selector_ms'] * 1e3 / r['M']:>12.1f} "
        f"{r['peak_mib']:>9.1f} {r['peak_mib'] / r['x_mib']:>10.2f} {r['prefill_ms']:>14.1f} {share:>15.1%}",
        flush=True,
    )


if __name__ == "__main__":
    main()
