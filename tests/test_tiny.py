"""The offline tiny models: deterministic, atomic builds that load like real checkpoints."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qtsplus.tiny import SPECIAL_TOKENS, TINY_MODEL_IDS, resolve_model, tiny_hash, tiny_model_path

REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5-vl"])
def test_build_is_deterministic(tmp_path, name):
    first = tiny_model_path(name, tmp_path / "a")
    second = tiny_model_path(name, tmp_path / "b")
    assert first.name == second.name == f"{name}-{tiny_hash(name)}"
    for file in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert _digest(first / file) == _digest(second / file), file


def test_second_call_reuses_the_build(tmp_path):
    path = tiny_model_path("qwen3", tmp_path)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path("qwen3", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directories left behind


def test_concurrent_builds_agree(tmp_path):
    code = "from qtsplus.tiny import tiny_model_path; print(tiny_model_path('qwen3'))"
    env = {
        **os.environ,
        "QTSPLUS_CACHE": str(tmp_path),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    # the last line: imports may print warnings (e.g. DeepSpeed's accelerator notice) before the path
    paths = {p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    built = Path(paths.pop())
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [built.name]
    AutoModelForCausalLM.from_pretrained(built)


def test_tokenizer_round_trips_any_unicode(tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path("qwen3", tmp_path))
    rng = random.Random(0)
    planes = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FF), (0x300, 0x36F), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0x1F300, 0x1FAFF),
              (0x10000, 0x10FFFF)]  # fmt: skip
    texts = [
        "",
        "A man walks his dog.",
        'Return {"caption": "x", "tags": ["a", "b"]}',
        "e\u0301 (decomposed) vs \u00e9 (composed)",  # must not be NFC-normalised
        "tabs\tand\nnewlines\r\n  and   spaces  ",
        "null \x00 byte and \x7f del",
        "emoji 👩‍👩‍👧 flags 🇫🇷 and a private-use \ue000",
    ]
    for _ in range(200):
        lo, hi = rng.choice(planes)
        chars = (chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 30)))
        texts.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF))
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert all(i < 1024 for i in ids)  # plain text never produces a special token


def test_tokenizer_has_qwen_specials_and_chat_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path("qwen3", tmp_path))
    for token in SPECIAL_TOKENS:
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert (
        tok.decode(tok.encode(text), skip_special_tokens=True)
        == "system\nBe brief.\nuser\nHi\nassistant\n<think>\n\n</think>\n\n"
    )


def test_qwen3_reloads_with_from_pretrained(tmp_path):
    path = tiny_model_path("qwen3", tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 64 == 0
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen.pad_token_id == tok.pad_token_id
    ids = tok("A dog runs.", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_qwen25vl_reloads_with_matching_token_ids(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = tiny_model_path("qwen2.5-vl", tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2_5_vl"
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    vision = config.vision_config
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert vision.out_hidden_size == config.text_config.hidden_size
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert model.config.text_config.vocab_size >= len(tok)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_resolve_model():
    assert resolve_model("Qwen/Qwen3-8B", "abc") == ("Qwen/Qwen3-8B", "abc")
    assert resolve_model("/some/local/dir", None) == ("/some/local/dir", None)
    assert TINY_MODEL_IDS == {"tiny/qwen3", "tiny/qwen2.5-vl", "tiny/qwen2.5-vl-needle"}
    path, revision = resolve_model("tiny/qwen3", None)
    assert revision == tiny_hash("qwen3") and Path(path).name == f"qwen3-{revision}"
    assert resolve_model("tiny/qwen3", revision) == (path, revision)
    with pytest.raises(ValueError, match="revision"):
        resolve_model("tiny/qwen3", "0" * 12)
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny_model_path("llama")  # type: ignore[arg-type]
