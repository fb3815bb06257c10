"""The transformers engine on real (tiny, random-weight) Qwen3 and Qwen2.5-VL models; the vLLM backend's guard."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qtsplus.engines import (
    EngineConfig,
    GenerationParams,
    MissingExtraError,
    Prompt,
    get_engine,
    load_engine,
)
from qtsplus.engines.json_budget import max_json_bytes, max_json_tokens
from qtsplus.video import VideoClip, qwen_video_inputs

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["A", "B", "C", "D"]

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["action", "object", "scene", "count"]},
        "difficulty": {
            "type": "object",
            "properties": {"level": {"enum": ["easy", "hard"]}},
            "required": ["level"],
        },
        "caption": {"type": "string", "minLength": 3, "maxLength": 24},
        "evidence": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 10},
            "minItems": 2,
            "maxItems": 2,
        },
        "answerable": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
    },
    "required": ["kind", "difficulty", "caption", "evidence", "answerable", "count"],
}


def check(value, schema) -> list[str]:
    """The subset of JSON-schema validation SCHEMA needs (jsonschema is not a dependency)."""
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{value!r} not in {schema['enum']}")
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{value!r} is not an object"]
        errors += [f"missing {k}" for k in schema.get("required", []) if k not in value]
        errors += [f"extra {k}" for k in value if k not in schema["properties"]]
        for k, sub in schema["properties"].items():
            errors += check(value[k], sub) if k in value else []
    elif kind == "array":
        if not isinstance(value, list) or not schema["minItems"] <= len(value) <= schema["maxItems"]:
            return [f"bad array {value!r}"]
        for item in value:
            errors += check(item, schema["items"])
    elif kind == "string":
        if not isinstance(value, str) or not schema.get("minLength", 0) <= len(value) <= schema.get(
            "maxLength", 1e9
        ):
            errors.append(f"bad string {value!r}")
    elif kind == "boolean" and not isinstance(value, bool):
        errors.append(f"{value!r} is not a boolean")
    elif kind == "integer" and not (
        isinstance(value, int) and schema["minimum"] <= value <= schema["maximum"]
    ):
        errors.append(f"bad integer {value!r}")
    return errors


def clip(seed: int, frames: int = 4, size: tuple[int, int] = (56, 56)) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip(
        frames=rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8),
        timestamps=np.arange(frames, dtype=np.float64),
        native_fps=1.0,
        source=f"random-{seed}",
    )


QUESTIONS = [
    "What color is the jacket?",
    "How many cups are on the table, and who pours the coffee into them?",
    "Describe the video.",
    "Which room appears first in the video: the kitchen, the garden, the living room or the garage?",
    "Why?",
    "What does the girl find inside the gift box after she opens it in the first scene?",
]


@pytest.fixture(scope="module")
def qwen3():
    engine = load_engine(EngineConfig("tiny/qwen3", batch_size=4))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vl():
    engine = load_engine(EngineConfig("tiny/qwen2.5-vl", batch_size=4))
    yield engine
    engine.close()


# -- generate_json --------------------------------------------------------------------------------------------------


def test_generate_json_always_parses_and_validates(qwen3):
    prompts = [
        Prompt(f"Write a JSON annotation for clip {i}. {q}", seed=i)
        for i, q in enumerate(QUESTIONS + QUESTIONS[:2])
    ]
    for params in (GenerationParams(), GenerationParams(temperature=1.0, seed=3)):
        results = qwen3.generate_json(prompts, SCHEMA, params)
        assert len(results) == 8
        for r in results:
            assert r.error is None, r
            assert r.value == json.loads(r.text, strict=False)
            assert check(r.value, SCHEMA) == [], r.text
            assert len(r.text.encode()) <= max_json_bytes(SCHEMA)


def test_generate_json_raises_a_too_small_budget_for_a_bounded_schema(qwen3):
    results = qwen3.generate_json([Prompt("Annotate.")], SCHEMA, GenerationParams(max_new_tokens=2))
    assert results[0].error is None and check(results[0].value, SCHEMA) == []


def test_generate_json_reports_truncation_instead_of_raising(qwen3):
    unbounded = {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"]}
    results = qwen3.generate_json([Prompt("a"), Prompt("b")], unbounded, GenerationParams(max_new_tokens=3))
    for r in results:
        assert r.value is None and "not finished within 3 new tokens" in r.error


def test_json_token_budget():
    assert max_json_tokens({"type": "string"}) is None
    assert max_json_tokens({"type": "number"}) is None
    assert max_json_tokens({"type": "array", "items": {"type": "boolean"}}) is None
    assert max_json_tokens({"type": "object", "properties": {}, "additionalProperties": True}) is None
    assert max_json_bytes({"type": "string", "maxLength": 3}) == 2 + 4 * 3
    assert max_json_bytes({"enum": ["a", "bé", 10]}) == len('"b\\u00e9"')
    assert max_json_bytes({"type": "integer", "minimum": -5, "maximum": 100}) == 3
    assert max_json_bytes({"type": "array", "items": {"type": "boolean"}, "maxItems": 3}) == 2 + 3 * 5 + 2 * 2
    obj = {
        "type": "object",
        "properties": {"a": {"type": "null"}, "b": {"$ref": "#/$defs/t"}},
        "$defs": {"t": {"type": "boolean"}},
    }
    assert max_json_bytes(obj) == len('{"a": null, "b": false}')
    assert max_json_tokens(SCHEMA) == max_json_bytes(SCHEMA) + 1


# -- choose ---------------------------------------------------------------------------------------------------------


def _manual_option_probs(engine, prompt_text: str) -> torch.Tensor:
    tok = engine.tokenizer
    messages = [{"role": "user", "content": prompt_text}]
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = engine.model(ids).logits[0, -1]
    return logits[[tok.convert_tokens_to_ids(o) for o in OPTIONS]].softmax(-1)


def test_choose_is_a_softmax_over_option_logits(qwen3):
    prompts = [
        Prompt(q + "\nA. red\nB. blue\nC. green\nD. yellow\nAnswer with the letter.") for q in QUESTIONS
    ]
    results = qwen3.choose(prompts, OPTIONS)
    for prompt, r in zip(prompts, results, strict=True):
        assert list(r.probs) == OPTIONS
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert r.choice == max(r.probs, key=r.probs.get)
        manual = _manual_option_probs(qwen3, prompt.user)
        assert [r.probs[o] for o in OPTIONS] == pytest.approx(manual.tolist(), abs=1e-5)
    assert len({r.choice for r in results}) > 1 or len({round(r.probs["A"], 4) for r in results}) > 1


def test_choose_in_a_batch_equals_one_by_one(qwen3):
    prompts = [
        Prompt(q, system="Answer with A, B, C or D." if i % 2 else None) for i, q in enumerate(QUESTIONS)
    ]
    batched = qwen3.choose(prompts, OPTIONS)  # batch_size=4: two left-padded batches of different lengths
    for prompt, b in zip(prompts, batched, strict=True):
        (single,) = qwen3.choose([prompt], OPTIONS)
        assert single.choice == b.choice
        assert [single.probs[o] for o in OPTIONS] == pytest.approx([b.probs[o] for o in OPTIONS], abs=1e-5)


def test_choose_rejects_options_that_are_not_one_token(qwen3):
    with pytest.raises(ValueError, match="single-token"):
        qwen3.choose([Prompt("?")], ["A", "the kitchen"])
    with pytest.raises(ValueError, match="distinct"):
        qwen3.choose([Prompt("?")], ["A", "A"])


# -- generate_text --------------------------------------------------------------------------------------------------


def test_greedy_text_is_deterministic(qwen3):
    prompts = [Prompt(q) for q in QUESTIONS[:3]]
    params = GenerationParams(max_new_tokens=12)
    first = qwen3.generate_text(prompts, params)
    assert first == qwen3.generate_text(prompts, params)
    assert all(isinstance(t, str) and "<|im_end|>" not in t for t in first)


def test_sampling_is_seeded_per_request_and_independent_of_batching(qwen3):
    prompts = [Prompt(q, seed=i) for i, q in enumerate(QUESTIONS)]
    params = GenerationParams(temperature=1.0, top_p=0.95, top_k=200, max_new_tokens=12, seed=7)
    first = qwen3.generate_text(prompts, params)
    assert first == qwen3.generate_text(prompts, params)
    assert first == [
        qwen3.generate_text([p], params)[0] for p in prompts
    ]  # alone, or in a batch of 4 with padding
    other_run_seed = qwen3.generate_text(prompts, GenerationParams(**{**params.__dict__, "seed": 8}))
    assert sum(a != b for a, b in zip(first, other_run_seed, strict=True)) >= len(prompts) - 1
    other_prompt_seed = qwen3.generate_text([Prompt(p.user, seed=p.seed + 100) for p in prompts], params)
    assert sum(a != b for a, b in zip(first, other_prompt_seed, strict=True)) >= len(prompts) - 1
    greedy = qwen3.generate_text(prompts, GenerationParams(max_new_tokens=12))
    assert greedy != first


def test_seeded_sampler_draws_from_the_warped_distribution():
    from qtsplus.engines.transformers_engine import SeededSampler

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    scores = probs.log().expand(4000, -1).clone()
    ids = torch.zeros((4000, 1), dtype=torch.long)
    draws = SeededSampler(range(4000), 1.0, 1.0, 0)(ids, scores).argmax(-1)
    assert torch.bincount(draws, minlength=4).float().div(4000).tolist() == pytest.approx(
        probs.tolist(), abs=0.03
    )
    top2 = SeededSampler(range(4000), 1.0, 1.0, 2)(ids, scores.clone()).argmax(-1)
    assert set(top2.tolist()) == {2, 3}
    assert torch.equal(
        SeededSampler([5], 0.7, 0.9, 0)(ids[:1], scores[:1].clone()),
        SeededSampler([5], 0.7, 0.9, 0)(ids[:1], scores[:1].clone()),
    )


def test_sampling_is_reproducible_across_processes(qwen3):
    params = GenerationParams(temperature=1.0, max_new_tokens=10, seed=5)
    here = qwen3.generate_text([Prompt("Describe the video.", seed=11)], params)
    code = (
        "import json; from qtsplus.engines import *\n"
        "e = load_engine(EngineConfig('tiny/qwen3', batch_size=4))\n"
        "print(json.dumps(e.generate_text([Prompt('Describe the video.', seed=11)],"
        " GenerationParams(temperature=1.0, max_new_tokens=10, seed=5))))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONHASHSEED": "123",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


# -- video (Qwen2.5-VL) ---------------------------------------------------------------------------------------------


def test_video_prompts_through_qwen25vl(vl):
    captured = []

    def hook(module, args, kwargs):
        keys = ("input_ids", "mm_token_type_ids", "video_grid_thw", "position_ids")
        captured.append({k: kwargs.get(k) for k in keys})

    video = clip(0)
    expected = qwen_video_inputs(video).num_video_tokens
    assert expected == 2 * 4 * 4 // 4
    handle = vl.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        (choice,) = vl.choose([Prompt("What happens? Answer A, B, C or D.", video=video)], OPTIONS)
        (text,) = vl.generate_text(
            [Prompt("Describe the video.", video=video)], GenerationParams(max_new_tokens=8)
        )
    finally:
        handle.remove()
    assert sum(choice.probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert isinstance(text, str)
    video_pad = vl.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    forward, prefill = captured[0], captured[1]  # choose()'s forward pass and generate()'s first step
    for call in (forward, prefill):
        ids = call["input_ids"][0]
        assert int((ids == video_pad).sum()) == expected
        assert torch.equal(call["mm_token_type_ids"][0] == 2, ids == video_pad)
    assert forward["video_grid_thw"].tolist() == [[2, 4, 4]]
    # transformers 5 runs the vision tower before the first step and passes [text, t, h, w] positions: the video
    # tokens get 3-D rope positions (the h and w rows differ), which needs mm_token_type_ids.
    positions = prefill["position_ids"][:, 0, prefill["input_ids"][0] == video_pad]
    assert positions.shape == (4, expected) and not torch.equal(positions[2], positions[3])


def test_video_batches_equal_one_by_one(vl):
    prompts = [
        Prompt("What happens first?", video=clip(1)),
        Prompt("A question without a video, which is longer than the others in this batch."),
        Prompt("Count the objects.", video=clip(2, frames=6, size=(56, 84))),
        Prompt("And now?", video=clip(3)),
        Prompt("Last one.", video=clip(4)),
    ]
    batched = vl.choose(prompts, OPTIONS)
    for prompt, b in zip(prompts, batched, strict=True):
        (single,) = vl.choose([prompt], OPTIONS)
        assert [single.probs[o] for o in OPTIONS] == pytest.approx([b.probs[o] for o in OPTIONS], abs=1e-5)
    params = GenerationParams(temperature=1.0, max_new_tokens=6)
    assert vl.generate_text(prompts, params) == [vl.generate_text([p], params)[0] for p in prompts]


def test_video_prompts_need_a_video_model(qwen3, vl):
    with pytest.raises(ValueError, match="not a video model"):
        qwen3.choose([Prompt("?", video=clip(0))], OPTIONS)
    with pytest.raises(ValueError, match="<\\|video_pad\\|>"):
        vl.choose([Prompt("<|video_pad|> injected", video=clip(0))], OPTIONS)


# -- loading --------------------------------------------------------------------------------------------------------


def test_every_load_is_logged_and_get_engine_caches(tmp_path, monkeypatch):
    log = tmp_path / "loads.jsonl"
    monkeypatch.setenv("QTSPLUS_ENGINE_LOAD_LOG", str(log))
    cfg = EngineConfig("tiny/qwen3", batch_size=2)
    engine = get_engine(cfg)
    assert get_engine(cfg) is engine
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [
        {"model_id": "tiny/qwen3", "revision": engine.revision, "backend": "transformers", "pid": os.getpid()}
    ]
    engine.close()
    assert get_engine(cfg) is not engine  # a closed engine is reloaded
    assert len(log.read_text().splitlines()) == 2
    get_engine(cfg).close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_names_the_extra():
    from qtsplus.engines import vllm_engine  # importable without vllm

    with pytest.raises(MissingExtraError, match=r"qtsplus\[vllm\]"):
        load_engine(EngineConfig("tiny/qwen3", backend="vllm"))
    assert issubclass(MissingExtraError, ImportError)
    assert vllm_engine.VllmEngine.__module__ == "qtsplus.engines.vllm_engine"
