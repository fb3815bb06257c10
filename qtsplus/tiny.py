"""Tiny offline stand-ins for Qwen3 and Qwen2.5-VL: real architectures, random weights, a small trained tokenizer.

Tests and dry runs load them through the same ``from_pretrained`` path as a real checkpoint, so the engines cannot
tell the difference. Each build is deterministic (fixed seed, fixed corpus ``tiny/corpus.txt``) and is saved once under
``$QTSPLUS_CACHE/tiny/<name>-<hash>``, where the hash covers the model spec, the tokenizer recipe, the corpus, this
module's build version and the torch/transformers versions that produced the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal

TinyName = Literal["qwen3", "qwen2.5-vl", "qwen2.5-vl-needle"]
TINY_MODEL_IDS = frozenset({"tiny/qwen3", "tiny/qwen2.5-vl", "tiny/qwen2.5-vl-needle"})
_BUILD_LOCK = threading.Lock()

BUILD_VERSION = "2"  # bump when the build recipe changes in a way the spec below does not capture
# 2: Qwen2.5-VL folders carry their processor files (vLLM loads them)
SEED = 0
BPE_VOCAB_SIZE = 1024
VOCAB_MULTIPLE = 64  # the model's vocabulary is padded past the tokenizer's, as in real Qwen checkpoints

# Qwen's special tokens, in Qwen's order; appended after the BPE vocabulary like in the real tokenizers.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
THINK_TOKENS = ("<think>", "</think>")  # Qwen3's added (non-special) tokens

# Qwen2's pre-tokenisation regex: contractions, letter runs, single digits, punctuation runs, whitespace.
PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_CONTENT = (
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)
# ChatML as in Qwen2.5-VL: a default system prompt when none is given.
QWEN25_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}" + _CONTENT + "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# ChatML as in Qwen3: no default system prompt; enable_thinking=False pre-fills an empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}" + _CONTENT + "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)

_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.1,  # larger than the usual 0.02 so that outputs depend visibly on the input
)
# Attention heads of 32 dimensions: the smallest head size vLLM's CPU attention supports (32, 64, 80, ...), so the
# same tiny models run on both engines. Qwen2.5-VL's head size is hidden_size / num_attention_heads, and its
# mrope_section (temporal, height, width rotary pairs) must sum to head_dim / 2.
_SPECS: dict[str, dict] = {
    "qwen3": dict(text=dict(_TEXT, head_dim=32, tie_word_embeddings=True), chat_template=QWEN3_CHAT_TEMPLATE),
    "qwen2.5-vl": dict(
        text=dict(
            _TEXT,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=112,
            fullatt_block_indexes=[1],
            initializer_range=0.1,
        ),
        chat_template=QWEN25_CHAT_TEMPLATE,
    ),
}
# The needle task's host (qtsplus.needle, docs/needle.md): an LM initialised at 0.125 ~ 1/sqrt(hidden) (at 0.02 a
# 64-wide LM trained from scratch sat at chance on the needle questions through 1,500 steps), and a vision tower of
# depth 0 (patch embedding and merger: each visual token sees only its own cell, as the task's geometry intends),
# taught to see by qtsplus.needle.vision before the LM learns.
_SPECS["qwen2.5-vl-needle"] = dict(
    text=dict(
        _TEXT,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.125,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    ),
    vision=dict(depth=0, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                fullatt_block_indexes=[], initializer_range=0.1),
    chat_template=QWEN25_CHAT_TEMPLATE,
)


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$QTSPLUS_CACHE``, else ``~/.cache/qtsplus``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("QTSPLUS_CACHE") or Path.home() / ".cache" / "qtsplus")


def _corpus() -> str:
    return (Path(__file__).parent / "tiny" / "corpus.txt").read_text(encoding="utf-8")


def tiny_hash(name: TinyName) -> str:
    """Short hash of everything that determines the build; it is the tiny model's revision."""
    import torch
    import transformers

    key = {
        "build_version": BUILD_VERSION,
        "name": name,
        "spec": _SPECS[name],
        "seed": SEED,
        "bpe_vocab_size": BPE_VOCAB_SIZE,
        "vocab_multiple": VOCAB_MULTIPLE,
        "special_tokens": SPECIAL_TOKENS,
        "think_tokens": THINK_TOKENS,
        "regex": PRETOKENIZE_REGEX,
        "corpus": hashlib.sha256(_corpus().encode()).hexdigest(),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def tiny_model_path(name: TinyName, cache_dir: Path | None = None) -> Path:
    """Directory of the tiny model ``name``, built on first use. Safe under concurrent callers: the build happens in a
    temporary directory that is renamed into place, so a reader never sees a partial model."""
    if name not in _SPECS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(_SPECS)}")
    parent = cache_root(cache_dir) / "tiny"
    final = parent / f"{name}-{tiny_hash(name)}"
    if final.is_dir():
        return final
    with _BUILD_LOCK:  # threads share torch's global RNG, which seeds the weights: one build at a time
        if final.is_dir():
            return final
        parent.mkdir(parents=True, exist_ok=True)
        _build_into(name, parent, final)
    return final


def _build_into(name: TinyName, parent: Path, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    try:
        _build(name, tmp)
        # mkdtemp (and safetensors) create owner-only files: make them readable like any other cache entry
        for p in (tmp, *tmp.iterdir()):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(model_id: str, revision: str | None) -> tuple[str, str | None]:
    """Map ``tiny/<name>`` to its local directory and config-hash revision; pass any other id through unchanged."""
    if model_id not in TINY_MODEL_IDS:
        return model_id, revision
    name = model_id.removeprefix("tiny/")
    expected = tiny_hash(name)
    if revision is not None and revision != expected:
        raise ValueError(
            f"{model_id} revision {revision!r} cannot be rebuilt by this code version (it builds {expected!r})"
        )
    return str(tiny_model_path(name)), expected


def build_tokenizer(chat_template: str):
    """Byte-level BPE trained on the bundled corpus, with Qwen's special tokens and the given chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any unicode text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus().splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=_TEXT["max_position_embeddings"],
        chat_template=chat_template,
    )


def vl_config(name: TinyName = "qwen2.5-vl", *, vocab_size: int, image_token_id: int, video_token_id: int,
              vision_start_token_id: int, vision_end_token_id: int, bos_token_id: int, eos_token_id: int,
              pad_token_id: int, **overrides):
    """The tiny Qwen2.5-VL's config (`Qwen2_5_VLConfig`) for a vocabulary and its special token ids: what the saved
    tiny model is built from, and what tests build an in-memory model from (with their own small vocabulary)."""
    from transformers import Qwen2_5_VLConfig

    spec = _SPECS[name]
    if "vision" not in spec:
        raise ValueError(f"{name} is not a Qwen2.5-VL spec")
    text = dict(spec["text"], vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id)
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(spec["vision"]), image_token_id=image_token_id,
                            video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
                            vision_end_token_id=vision_end_token_id, tie_word_embeddings=True, **overrides)


def _build(name: TinyName, out: Path) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig

    spec = _SPECS[name]
    tokenizer = build_tokenizer(spec["chat_template"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    token_ids = dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    text = dict(spec["text"], vocab_size=vocab_size, **token_ids)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if name == "qwen3":
            from transformers import Qwen3Config, Qwen3ForCausalLM

            model = Qwen3ForCausalLM(Qwen3Config(**text))
        else:
            from transformers import Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration(vl_config(
                name, vocab_size=vocab_size, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                **token_ids))
    # As in Qwen's instruct checkpoints: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar for a 1 MB model
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
    if "vision" in spec:
        _write_processor_files(spec["vision"], out)
    (out / "tiny_build.json").write_text(
        json.dumps({"name": name, "revision": tiny_hash(name)}, indent=2) + "\n"
    )



def _write_processor_files(vision: dict, out: Path) -> None:
    """Qwen2.5-VL's image and video processor configs, as the released checkpoints ship them (in transformers 5's
    ``size`` form). Written as JSON rather than through the processor classes: the video processor needs torchvision,
    which CPU machines do not have. vLLM's processor reads them; the transformers engine prepares pixels itself."""
    from qtsplus.video import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    common = {
        "patch_size": vision["patch_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"],
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "processor_class": "Qwen2_5_VLProcessor",
    }
    image = dict(common, image_processor_type="Qwen2VLImageProcessor", resample=3,
                 size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    video = dict(common, video_processor_type="Qwen2VLVideoProcessor", resample=3, do_sample_frames=False,
                 size={"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768})
    for name, cfg in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
        (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
