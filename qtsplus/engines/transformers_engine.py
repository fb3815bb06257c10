"""The transformers backend: any causal LM, plus Qwen2.5-VL with video; xgrammar for constrained JSON.

Batches are left-padded (the next token of every row is then at the last position) and formed from prompts sorted by
length. Sampling does not use torch's global RNG: each row draws Gumbel noise from its own generator, seeded from
(GenerationParams.seed, Prompt.seed), so a prompt's output is the same whatever batch it lands in.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from qtsplus.checkpoints import QTSPLUS_MODEL_TYPE, host_model_module
from qtsplus.engines import (
    NO_PROGRESS_ENV,
    ChoiceResult,
    Engine,
    EngineConfig,
    GenerationParams,
    JsonResult,
    Prompt,
    record_load,
)
from qtsplus.engines.chat import encode_prompt, option_token_ids, request_seed
from qtsplus.engines.json_budget import max_json_tokens
from qtsplus.tiny import TINY_MODEL_IDS, resolve_model

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass
class _Encoded:
    ids: list[int]
    video: Any = None  # qtsplus.video.QwenVideoInputs


class TransformersEngine(Engine):
    def __init__(self, cfg: EngineConfig):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if os.environ.get(NO_PROGRESS_ENV) == "1":
            hf_logging.disable_progress_bar()
        self.cfg = cfg
        self.model_id = cfg.model_id
        path, revision = resolve_model(cfg.model_id, cfg.revision)
        kwargs = dict(
            revision=None if cfg.model_id in TINY_MODEL_IDS else revision,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.device = _device(cfg.device)
        host = host_model_module(path)  # a trained QTSplus checkpoint: selector between tower and LM
        config = AutoConfig.from_pretrained(path, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        self.is_video_model = config.model_type in ("qwen2_5_vl", QTSPLUS_MODEL_TYPE)
        if host is not None:
            model_class = host.QTSplusForConditionalGeneration
        elif self.is_video_model:
            from transformers import Qwen2_5_VLForConditionalGeneration as model_class
        else:
            model_class = AutoModelForCausalLM
        model = model_class.from_pretrained(
            path, config=config, dtype=_dtype(cfg.dtype, self.device), **kwargs
        )
        self.model = model.to(self.device).eval()
        # tiny: the config hash; hub: the commit the files came from; a local directory: what was asked, or "local"
        tiny = cfg.model_id in TINY_MODEL_IDS
        self.revision = revision if tiny else getattr(config, "_commit_hash", None) or revision or "local"

        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise ValueError(
                f"{cfg.model_id}: neither the tokenizer nor the generation config names an eos token"
            )
        self.eos_ids = eos
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        self.pad_id = eos[0] if pad is None else pad
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        if self.is_video_model:
            self.video_token_id = config.video_token_id
            self.image_token_id = config.image_token_id
        self._grammar_compiler = None
        self._grammars: dict[str, Any] = {}
        record_load(self.model_id, self.revision, "transformers")

    # -- the contract --------------------------------------------------------------------------------------------

    def generate_json(
        self, prompts: Sequence[Prompt], schema: dict, params: GenerationParams
    ) -> list[JsonResult]:
        grammar = self._grammar(schema)
        budget = max_json_tokens(schema)
        max_new = params.max_new_tokens if budget is None else max(params.max_new_tokens, budget)
        results = []
        for text, finished in self._generate(prompts, params, max_new, grammar, desc="json"):
            try:
                results.append(JsonResult(value=json.loads(text, strict=False), text=text, error=None))
            except json.JSONDecodeError as e:
                why = (
                    ""
                    if finished
                    else f" (not finished within {max_new} new tokens: raise max_new_tokens or bound the schema)"
                )
                results.append(JsonResult(value=None, text=text, error=f"{e}{why}"))
        return results

    def choose(self, prompts: Sequence[Prompt], options: Sequence[str]) -> list[ChoiceResult]:
        option_ids = torch.tensor(option_token_ids(self.tokenizer, options), device=self.device)
        encoded = [self.encode(p) for p in prompts]
        results: list[ChoiceResult | None] = [None] * len(prompts)
        for rows in self._batches(encoded, desc="choose"):
            batch = self.collate([encoded[i] for i in rows])
            if not self.is_video_model:  # Qwen2.5-VL derives its 3-D positions from the mask itself
                batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
            probs = logits[:, option_ids].softmax(-1).cpu()
            for row, p in zip(rows, probs.tolist(), strict=True):
                dist = dict(zip(options, p, strict=True))
                results[row] = ChoiceResult(choice=max(dist, key=dist.__getitem__), probs=dist)
        return results  # type: ignore[return-value]

    def generate_text(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        return [text for text, _ in self._generate(prompts, params, params.max_new_tokens, None, desc="text")]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._grammars.clear()
        self.closed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals -----------------------------------------------------------------------------------------------

    def _grammar(self, schema: dict):
        import xgrammar

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            if self._grammar_compiler is None:
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids
                )
                self._grammar_compiler = xgrammar.GrammarCompiler(info)
            # Compact JSON (no whitespace at all), exactly as vLLM's xgrammar backend with disable_any_whitespace:
            # the two engines then decode the same tokens. any_whitespace=False alone would still put ", " / ": ".
            self._grammars[key] = self._grammar_compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":")
            )
        return self._grammars[key]

    def encode(self, prompt: Prompt) -> _Encoded:
        """Token ids of the rendered chat; a video's single <|video_pad|> is expanded to one id per video token."""
        if prompt.video is not None and not self.is_video_model:
            raise ValueError(f"{self.model_id} is not a video model; it cannot take Prompt.video")
        ids, video = encode_prompt(
            self.tokenizer,
            prompt,
            self.video_token_id if self.is_video_model else None,
            self.model.config.vision_config if self.is_video_model else None,
        )
        if len(ids) >= self.cfg.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len={self.cfg.max_model_len}")
        return _Encoded(ids, video)

    def _batches(self, encoded: list[_Encoded], desc: str) -> Iterator[list[int]]:
        """Row indices in batches of cfg.batch_size, longest prompts first (less padding, out-of-memory early)."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))
        disable = os.environ.get(NO_PROGRESS_ENV) == "1" or not sys.stderr.isatty()
        from tqdm.auto import tqdm

        with tqdm(total=len(order), desc=f"{self.model_id} {desc}", unit="prompt", disable=disable) as bar:
            for start in range(0, len(order), self.cfg.batch_size):
                rows = order[start : start + self.cfg.batch_size]
                yield rows
                bar.update(len(rows))

    def collate(self, encoded: list[_Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded ids and mask; for Qwen2.5-VL also the videos (in row order) and the token-type ids from which
        transformers 5 computes the 3-D rope positions (without them it silently falls back to 1-D positions)."""
        length = max(len(e.ids) for e in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, e in enumerate(encoded):
            input_ids[row, length - len(e.ids) :] = torch.tensor(e.ids)
            attention_mask[row, length - len(e.ids) :] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        videos = [e.video for e in encoded if e.video is not None]
        if videos:
            batch["pixel_values_videos"] = torch.cat([v.pixel_values_videos for v in videos]).to(
                self.model.dtype
            )
            batch["video_grid_thw"] = torch.cat([v.video_grid_thw for v in videos])
            batch["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos])
            batch["mm_token_type_ids"] = (
                2 * (input_ids == self.video_token_id) + (input_ids == self.image_token_id)
            ).int()
        return {k: v.to(self.device) for k, v in batch.items()}

    def _generate(
        self, prompts: Sequence[Prompt], params: GenerationParams, max_new_tokens: int, grammar, desc: str
    ) -> list[tuple[str, bool]]:
        """(decoded text, ended with an eos token) per prompt, in prompt order."""
        from transformers import GenerationConfig

        encoded = [self.encode(p) for p in prompts]
        out: list[tuple[str, bool] | None] = [None] * len(prompts)
        for rows in self._batches(encoded, desc=desc):
            batch = self.collate([encoded[i] for i in rows])
            prompt_len = batch["input_ids"].shape[1]
            max_new = min(max_new_tokens, self.cfg.max_model_len - prompt_len)
            processors = LogitsProcessorList()
            if grammar is not None:
                import xgrammar.contrib.hf

                processors.append(xgrammar.contrib.hf.LogitsProcessor(grammar))  # one per generate() call
            if params.temperature > 0:
                seeds = [request_seed(params.seed, prompts[i].seed) for i in rows]
                processors.append(SeededSampler(seeds, params.temperature, params.top_p, params.top_k))
            # Every knob set explicitly: unset (None) fields would be filled from the checkpoint's generation config,
            # e.g. Qwen2.5-VL's repetition_penalty=1.05 or Qwen3's sampling defaults. Sampling happens in
            # SeededSampler, so generate() itself always takes the argmax; temperature/top_p/top_k are then unused
            # and set to transformers' defaults only to keep its validation quiet.
            config = GenerationConfig(
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                temperature=1.0,
                top_p=1.0,
                top_k=50,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_new_tokens=0,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
            )
            with torch.inference_mode():
                generated = self.model.generate(
                    **batch, generation_config=config, logits_processor=processors
                )
            for row, seq in zip(rows, generated[:, prompt_len:].tolist(), strict=True):
                finished = any(t in self.eos_ids for t in seq)
                if finished:
                    seq = seq[: min(seq.index(t) for t in self.eos_ids if t in seq)]
                out[row] = (self.tokenizer.decode(seq, skip_special_tokens=True), finished)
        return out  # type: ignore[return-value]


class SeededSampler(LogitsProcessor):
    """Sampling with temperature / top-k / top-p by the Gumbel-max trick, one torch.Generator per row.

    argmax(warped logits + Gumbel noise) is a draw from softmax(warped logits). Each row's noise comes from its own
    generator (seeded per request), so the draw depends on the request, not on the batch around it.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, top_k: int):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return scores + gumbel.to(scores.device, scores.dtype)
