"""The `null` backend: no model, instant, deterministic, schema-valid synthetic outputs.

For dry runs of a pipeline configuration without GPUs or weights, and for measuring the pipeline's own overhead
(benchmarks/pipeline_overhead.py). Its outputs carry no information about any video or caption.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Sequence
from typing import Any

from qtsplus.engines import (
    ChoiceResult,
    Engine,
    EngineConfig,
    GenerationParams,
    JsonResult,
    Prompt,
    record_load,
)

_WORDS = "the a man woman car bike street tree red blue two three runs holds left right before after".split()


def _rng(prompt: Prompt, salt: int) -> random.Random:
    digest = hashlib.sha256(f"{salt}\x00{prompt.seed}\x00{prompt.user}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def synthesize(schema: dict[str, Any], rng: random.Random) -> Any:
    """A value valid under a (simple, bounded) JSON schema: objects, arrays, enums, strings, numbers, booleans."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "object":
        return {k: synthesize(v, rng) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        lo = schema.get("minItems", 0)
        n = rng.randint(lo, schema.get("maxItems", lo + 3))
        return [synthesize(schema.get("items", {"type": "string"}), rng) for _ in range(n)]
    if kind == "string":
        lo, hi = schema.get("minLength", 1), schema.get("maxLength", 32)
        words, text = [], ""
        while len(text) < lo or (len(text) < hi and rng.random() < 0.8):
            words.append(rng.choice(_WORDS) + rng.choice(string.ascii_lowercase))
            text = " ".join(words)
        return text[:hi]
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 100))
    if kind == "number":
        return rng.uniform(schema.get("minimum", 0.0), schema.get("maximum", 1.0))
    if kind == "boolean":
        return rng.random() < 0.5
    raise ValueError(f"null engine cannot synthesize schema {schema!r}")


class NullEngine(Engine):
    """Answers every request without a model."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_id = cfg.model_id
        self.revision = "null"
        record_load(self.model_id, self.revision, "null")

    def generate_json(self, prompts: Sequence[Prompt], schema: dict, params: GenerationParams) -> list[JsonResult]:
        out = []
        for p in prompts:
            value = synthesize(schema, _rng(p, params.seed))
            out.append(JsonResult(value=value, text="", error=None))
        return out

    def choose(self, prompts: Sequence[Prompt], options: Sequence[str]) -> list[ChoiceResult]:
        results = []
        for p in prompts:
            rng = _rng(p, 0)
            weights = [rng.random() + 1e-3 for _ in options]
            total = sum(weights)
            probs = {o: w / total for o, w in zip(options, weights, strict=True)}
            results.append(ChoiceResult(choice=max(probs, key=probs.__getitem__), probs=probs))
        return results

    def generate_text(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        return [synthesize({"type": "string", "minLength": 8, "maxLength": 120}, _rng(p, params.seed)) for p in prompts]

    def close(self) -> None:
        self.closed = True
