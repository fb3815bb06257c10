"""Forward time and peak memory of the QTSplus selector against M, at Qwen2.5-VL-3B shapes.

Shapes: d = 2048, 16 query heads, 2 K/V heads, SwiGLU 11008, 32 question tokens, scoring depth 1, re-encoding depth 1.

--part scorer (default): the scoring stage (scorer -> r -> budget head -> top-n indices, everything before the
re-encoder) with the scoring head as first written (`_reference_head_scores`: RMSNorm over X, whole logits) and as it
is now (folded RMSNorm, streamed over M), side by side, n_max = 2560, the budget head as initialised (it reads max r
and H(p)), x-side norm weight uniform in [0.5, 1.5]. Peak memory: each form in a fresh process, a warm-up on 1024
tokens pages in the kernels, then the peak is reset and one full forward's growth is read (CPU: the kernel's peak RSS,
VmHWM, above the RSS before the call; CUDA: max_memory_allocated above the allocation before the call); that run's
indices and log r are compared. Time: a third process runs the two forms alternately (before, after, before, ...)
and reports each one's median, so that both see the same background load (this machine's 2 cores are shared);
repeats: max(3, 60000 / M) unless --repeats. MB = 10^6 bytes; "load" is the 1-minute load average after the row.
The last line is, for the largest M, `scorer: speedup=<x> peak_mb=<new> peak_mb_before=<old> indices_equal=<true|false>`.

--part selector: one inference forward of the whole selector (hard top-n, rho fixed at 0.11, about the paper's Fig. 4
operating point: ~180k visual tokens -> ~20k kept, n_max = M) in a fresh process per size, its peak memory, and one LM
prefill over the n kept tokens: one Qwen2_5_VLDecoderLayer at the 3B shapes (SDPA, causal), timed and multiplied by the
36 layers (embedding, final norm and LM head are left out, which flatters the selector's share a little).

    python -m benchmarks.selector                              # scorer, M in {2k, 20k, 180k}, 2 CPU threads
    python -m benchmarks.selector --part selector --sizes 2000 20000 --device cpu --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLRotaryEmbedding,
)

from benchmarks.timing import peak_memory, sync, timed
from qtsplus.selectors.base import compact, topk_keep
from qtsplus.selectors.qtsplus import QTSplusSelector, SelectorConfig, budget_size
from qtsplus.selectors.qtsplus.selector import _reference_head_scores

ROOT = Path(__file__).resolve().parents[1]

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, QUESTION = 2048, 16, 2, 11008, 36, 32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["scorer", "selector"], default="scorer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 180_000], help="values of M")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--rho", type=float, default=0.11, help="--part selector: fixed retention fraction (rho_min = rho_max)"
    )
    parser.add_argument("--n-max", type=int, default=2560, help="--part scorer: the cap on kept tokens")
    parser.add_argument("--scoring-depth", type=int, default=1)
    parser.add_argument("--reencoder-depth", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=None, help="default: max(3, 60000 / M) (scorer), 5 (selector)"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--form", choices=[*FORMS, "both"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.part == "selector":
        args.repeats = args.repeats or 5
    torch.set_num_threads(args.threads)

    if args.worker is not None:
        result = measure_scorer(args.worker, args) if args.part == "scorer" else measure(args.worker, args)
        print(json.dumps(result))
        return
    common = [f"--part={args.part}", f"--device={args.device}", f"--dtype={args.dtype}", f"--threads={args.threads}",
              f"--rho={args.rho}", f"--n-max={args.n_max}", f"--scoring-depth={args.scoring_depth}",
              f"--reencoder-depth={args.reencoder_depth}"]  # fmt: skip
    common += [f"--repeats={args.repeats}"] if args.repeats else []
    if args.part == "scorer":
        compare_scorers(args, common)
        return

    print_header(args)
    for m in args.sizes:
        print_row(worker(m, common))


def worker(m: int, args: list[str]) -> dict:
    """Run one measurement in a fresh process (so that its peak memory is its own); its last stdout line is JSON."""
    cmd = [sys.executable, "-m", "benchmarks.selector", "--worker", str(m), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"worker {' '.join(cmd[3:])} failed ({run.returncode}):\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# --part scorer: the scoring head as first written against the folded, streamed one

FORMS = ("before", "after")


def compare_scorers(args: argparse.Namespace, common: list[str]) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"QTSplus scoring stage (scorer, budget head, top-n) at Qwen2.5-VL-3B shapes: {args.dtype}, {device}, "
          f"L={QUESTION}, scoring depth {args.scoring_depth}, n_max={args.n_max}; before = RMSNorm over X and whole "
          f"logits, after = folded and streamed; ms = median of interleaved forwards; MB = 10^6 bytes")  # fmt: skip
    header = (
        f"{'M':>8} {'n':>5} {'reps':>5} {'before ms':>10} {'after ms':>10} {'speedup':>8} {'before MB':>10} "
        f"{'after MB':>9} {'indices equal':>14} {'max |d log r|':>14} {'load':>5}"
    )
    print(header)
    print("-" * len(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.sizes:
            peaks, outs = {}, {}
            for form in FORMS:  # each peak in a fresh process, with its indices and log r
                path = Path(tmp) / f"{m}-{form}.pt"
                peaks[form] = worker(m, [*common, f"--form={form}", f"--out={path}"])["peak_mb"]
                outs[form] = torch.load(path)
            times = worker(m, [*common, "--form=both"])  # both forms in one process, alternating
            equal = torch.equal(outs["before"]["indices"], outs["after"]["indices"])
            a, b = outs["before"]["log_r"], outs["after"]["log_r"]
            finite = a.isfinite() & b.isfinite()
            diff = float((a - b)[finite].abs().max()) if bool(finite.any()) else 0.0
            if not torch.equal(a.isfinite(), b.isfinite()):
                diff = math.inf
            speedup = times["before"] / times["after"]
            load = os.getloadavg()[0]
            print(f"{m:>8} {outs['after']['n']:>5} {times['repeats']:>5} {times['before']:>10.1f} "
                  f"{times['after']:>10.1f} {speedup:>7.2f}x {peaks['before']:>10.1f} {peaks['after']:>9.1f} "
                  f"{str(equal).lower():>14} {diff:>14.2e} {load:>5.1f}", flush=True)  # fmt: skip
    print(f"scorer: speedup={speedup:.2f} peak_mb={peaks['after']:.1f} peak_mb_before={peaks['before']:.1f} "
          f"indices_equal={str(equal).lower()}")  # fmt: skip


def measure_scorer(m: int, args: argparse.Namespace) -> dict:
    """--form before|after: the peak growth of one forward of that form in this fresh process (after a warm-up on
    1024 tokens that pages in the kernels); saves its indices, log r and n to args.out. --form both: the median time
    of each form over `repeats` alternating forwards (before, after, before, ...), so that both see the same load."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    config = SelectorConfig(
        hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV_HEADS, intermediate_size=FFN,
        scoring_depth=args.scoring_depth, reencoder_depth=args.reencoder_depth, n_max=args.n_max,
    )  # fmt: skip
    selector = QTSplusSelector(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # a non-trivial x-side norm weight, as an LM's input_layernorm has
        selector.scorer.head.x_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, m, HIDDEN, device=device, dtype=dtype)
    q = torch.randn(1, QUESTION, HIDDEN, device=device, dtype=dtype)
    heads = {"before": _reference_head_scores, "after": None}

    with torch.inference_mode():
        for head in heads.values() if args.form == "both" else [heads[args.form]]:
            scoring_stage(selector, x[:, :1024], q, head)  # warm-up: kernels, thread pools
        sync(device)
        if args.form != "both":
            before = peak_memory(device, reset=True)
            indices, log_r, n = scoring_stage(selector, x, q, heads[args.form])
            sync(device)
            peak = peak_memory(device) - before
            torch.save(dict(indices=indices.cpu(), log_r=log_r.cpu(), n=n), args.out)
            return dict(M=m, form=args.form, peak_mb=peak / 1e6)
        repeats = args.repeats or max(3, round(60_000 / m))  # small M: more repeats, the times are short and noisy
        seconds = {form: [] for form in heads}
        for _ in range(repeats):
            for form, head in heads.items():
                start = time.perf_counter()
                scoring_stage(selector, x, q, head)
                sync(device)
                seconds[form].append(time.perf_counter() - start)
    return dict(M=m, repeats=repeats, **{form: statistics.median(s) * 1e3 for form, s in seconds.items()})


def scoring_stage(selector: QTSplusSelector, x: torch.Tensor, q: torch.Tensor, head=None):
    """What `QTSplusSelector.forward` does before re-encoding, in inference: log r, the budget, the top-n indices.
    head: None for the selector's own scoring head, or a function (head, x, x_mask, q, q_mask) -> log r."""
    x_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    q_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=x.device)
    num_tokens = x_mask.sum(-1)
    scorer = selector.scorer
    if head is None:
        log_r = scorer(x, x_mask, q, q_mask)
    else:
        question = q
        for block in scorer.blocks:
            question = block(question, x_mask, context=x)
        log_r = head(scorer.head, x, x_mask, question, q_mask)
    rho = selector.budget_head(q, q_mask, log_r.exp(), num_tokens)
    n = budget_size(rho, num_tokens, selector.config.n_max)
    indices, _ = compact(topk_keep(log_r + num_tokens.float().log()[:, None], n))
    return indices, log_r, int(n[0])


# ---------------------------------------------------------------------------------------------------------------------
# --part selector: the whole selector against an LM prefill over the kept tokens


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
