"""lmms-eval model adapter: run lmms-eval benchmarks (Video-MME, MLVU, TempCompass, ...) on a QTSplus checkpoint.

Importing this module registers the model name ``qtsplus`` with lmms-eval. Then, in Python::

    import qtsplus.evaluation.lmms_eval_adapter  # noqa: F401  (registers "qtsplus")
    from lmms_eval.evaluator import simple_evaluate
    results = simple_evaluate(model="qtsplus", model_args="pretrained=/path/to/ckpt,max_frames=48", tasks=["videomme"])

or from the shell, through lmms-eval's own CLI with the model registered first (same arguments as ``lmms-eval``)::

    python -m qtsplus.evaluation.lmms_eval_adapter --model qtsplus --model_args pretrained=/path/to/ckpt \\
        --tasks videomme --batch_size 1 --output_path runs/lmms --log_samples

The model runs on the project's transformers engine (``qtsplus.engines``): the same chat template, frame sampling
(``qtsplus.video.load_video``) and token layout as training and the rest of the pipeline. ``pretrained`` may be a
QTSplus checkpoint, a plain Qwen2.5-VL checkpoint (the teacher, no selection) or a tiny model id (``tiny/qwen2.5-vl``).

model_args (``key=value,...``):
    pretrained       checkpoint folder or model id (required)
    selection        true | false; default: on for a QTSplus checkpoint. ``false`` keeps every video token (the
                     teacher's forward through the same weights); ``true`` on a model without a selector is an error
    fps, min_frames, max_frames, min_pixels, max_pixels
                     frame sampling (``qtsplus.video.SamplingConfig``); max_frames defaults to 48 (the paper's
                     evaluation setting), the rest to SamplingConfig's defaults
    max_new_tokens   default generation budget, used when a task's generation_kwargs do not set max_new_tokens
    loglikelihood_output
                     logprob (default): loglikelihood returns the summed log-probability, as lmms-eval's API
                     documents; nll: its negation. lmms-eval's own multiple_choice scoring (and tasks such as
                     egoschema_mcppl) pick the choice with the LOWEST value, because its LLaVA-style adapters return
                     a loss: run those tasks with loglikelihood_output=nll
    batch_size       prompts per forward pass (default 1)
    device, dtype, revision, max_model_len, system_prompt, seed
                     passed to the engine config / prompts (see qtsplus.engines.EngineConfig, Prompt)

Requests: ``generate_until`` (free text; ``until`` stop strings and ``max_new_tokens``/``temperature``/``top_p``/
``top_k`` of the task's generation_kwargs are honoured; beams are not supported), ``loglikelihood`` (and so
``multiple_choice`` tasks: the summed log-probability of the continuation after the context, with the video, from one
forward pass; the continuation is the start of the assistant's answer) and ``generate_until_multi_round``.
Each request takes at most one video: a video file or a folder of frames, as ``doc_to_visual`` returns it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from qtsplus.engines import EngineConfig, GenerationParams, MissingExtraError, Prompt, get_engine
from qtsplus.engines.chat import encode_prompt
from qtsplus.video import IMAGE_EXTENSIONS, SamplingConfig, VideoClip, load_video

INSTALL_HINT = "pip install -e '.[lmms-eval]'"

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError as e:  # lmms_eval itself, or one of the packages its model API imports
    raise MissingExtraError(
        f"qtsplus.evaluation.lmms_eval_adapter needs lmms-eval: {INSTALL_HINT} "
        f"(or see docs/lmms_eval.md for a lean install without torchvision); import failed: {e}"
    ) from e

try:  # lmms-eval >= 0.7 normalises every response with unwrap_generation_output before the task sees it
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
except ImportError:  # older versions pass responses through unchanged
    GenerationResult = unwrap_generation_output = None

log = logging.getLogger(__name__)

MODEL_NAME = "qtsplus"
CLASS_PATH = "qtsplus.evaluation.lmms_eval_adapter.QTSplusLMM"  # not __name__: it is "__main__" under -m
EVAL_MAX_FRAMES = 48  # the QTSplus paper evaluates with at most 48 frames per video (40 in training)
CLIP_CACHE_SIZE = 4  # decoded videos kept between requests (a benchmark asks several questions per video)
_PLACEHOLDER = re.compile(r"<(?:image|video)>\n?")  # tasks' own visual placeholders; the adapter places the video


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an integer, got {value!r}") from e


@register_model(MODEL_NAME)
class QTSplusLMM(lmms):
    """lmms-eval model ``qtsplus``: a QTSplus (or plain Qwen2.5-VL) checkpoint served by qtsplus' TransformersEngine."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        selection: bool | str | None = None,
        fps: float | None = None,
        min_frames: int | None = None,
        max_frames: int = EVAL_MAX_FRAMES,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_new_tokens: int = 512,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        max_model_len: int = 32768,
        system_prompt: str | None = None,
        seed: int = 0,
        loglikelihood_output: str = "logprob",
        max_batch_size: int | None = None,  # passed by lmms-eval's evaluator; unused (no automatic batch size)
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"unknown model_args for {MODEL_NAME}: {', '.join(sorted(kwargs))}")
        if batch_size in (None, "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 1  # lmms-eval's "auto" batch size is not supported: one prompt per forward pass
        self.batch_size_per_gpu = _as_int(batch_size, "batch_size")
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        self.seed = _as_int(seed, "seed")
        if loglikelihood_output not in ("logprob", "nll"):
            raise ValueError(f"loglikelihood_output must be logprob or nll, got {loglikelihood_output!r}")
        self.loglikelihood_output = loglikelihood_output
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None

        sampling = {"max_frames": _as_int(max_frames, "max_frames")}
        if fps is not None:
            sampling["fps"] = float(fps)
        for name, value in (("min_frames", min_frames), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None:
                sampling[name] = _as_int(value, name)
        if "min_frames" not in sampling:  # SamplingConfig requires min_frames <= max_frames
            sampling["min_frames"] = min(SamplingConfig.min_frames, sampling["max_frames"])
        self.sampling = SamplingConfig(**sampling)

        # data-parallel runs (accelerate launch / torchrun): one engine per process, on that process's GPU
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            self._rank = int(os.environ.get("RANK", "0"))
            self._world_size = world_size
        engine_device = device or "auto"
        if world_size > 1 and engine_device in ("auto", "cuda") and torch.cuda.is_available():
            engine_device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"

        self.engine = get_engine(
            EngineConfig(
                model_id=str(pretrained),
                revision=None if revision is None else str(revision),
                dtype=str(dtype),
                device=str(engine_device),
                batch_size=self.batch_size_per_gpu,
                max_model_len=_as_int(max_model_len, "max_model_len"),
            )
        )
        model = self.engine.model
        self.has_selector = hasattr(model, "selector") and hasattr(model, "selection")
        if selection is None:
            self.selection = self.has_selector
        else:
            self.selection = _as_bool(selection, "selection")
            if self.selection and not self.has_selector:
                raise ValueError(
                    f"selection=true needs a QTSplus checkpoint; {pretrained} ({type(model).__name__}) has no selector"
                )
        self.pretrained = str(pretrained)
        self._clips: OrderedDict[str, VideoClip] = OrderedDict()
        self._warned: set[str] = set()

    # -- what lmms-eval reads -------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.model

    # -- requests -------------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, per the task's generation_kwargs) text for each request, cut at its ``until`` strings."""
        items = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            params, until = self._generation(gen_kwargs, doc_id)
            items.append((i, context, visuals, params, until, doc_id))
        # one engine call per chunk of requests with the same generation parameters; grouped by video so that a
        # video's questions share one decode (clip cache), then restored to the request order
        items.sort(key=lambda it: (repr(it[3]), self._video_key(it[2]), it[0]))
        out: list[str | None] = [None] * len(requests)
        bar = self._progress(len(requests), "generate_until")
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            groups: dict[str, list] = {}
            for it in chunk:
                groups.setdefault(repr(it[3]), []).append(it)
            for group in groups.values():
                prompts = [self._prompt(ctx, vis, doc_id) for _, ctx, vis, _, _, doc_id in group]
                with self._selection():
                    texts = self.engine.generate_text(prompts, group[0][3])
                for (i, context, _, _, until, _), text in zip(group, texts, strict=True):
                    text = _cut(text, until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list:
        """(summed log-probability of the continuation, whether greedy decoding would produce it) per request
        (wrapped in a GenerationResult where lmms-eval would otherwise turn the pair into a string).

        The context is the user turn (with the video), the continuation is scored as the start of the assistant turn;
        one forward pass per request over [prompt ids + continuation ids]. With selection on, the selector scores
        the video against the question only (the continuation is excluded from its question tokens).
        """
        items = []
        for i, req in enumerate(requests):
            args = req.args
            context, target = args[0], args[1]
            visuals: list = []
            doc = None
            if len(args) >= 6:
                doc_to_visual, doc_id, task, split = args[2:6]
                doc = self.task_dict[task][split][doc_id]
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
            else:  # ("", choice): an unconditional request (acc_mutual_info)
                doc_id = None
            continuation = target if isinstance(target, str) else target(doc)
            items.append((i, context, str(continuation), visuals, doc_id))
        items.sort(key=lambda it: (self._video_key(it[3]), it[0]))
        out: list = [None] * len(requests)
        bar = self._progress(len(requests), "loglikelihood")
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            encoded = []
            for _, context, continuation, visuals, doc_id in chunk:
                ids, video = self._encode(self._prompt(context, visuals, doc_id))
                cont = self.tokenizer.encode(continuation, add_special_tokens=False)
                encoded.append((ids, cont, video))
            with self._selection():
                scores = self._score(encoded)
            for (i, context, continuation, _, _), (logprob, greedy) in zip(chunk, scores, strict=True):
                score = (logprob if self.loglikelihood_output == "logprob" else -logprob, greedy)
                out[i] = _score_output(score)
                self.cache_hook.add_partial("loglikelihood", (context, continuation), score)
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation, one request at a time: round 0 answers the context; each later round asks the
        task's ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)`` for
        (visuals, context, terminal, outputs so far, round info) and stops when it says terminal."""
        out = []
        bar = self._progress(len(requests), "generate_until_multi_round")
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args[:7]
            doc = self.task_dict[task][split][doc_id]
            gen_kwargs = {k: v for k, v in (gen_kwargs or {}).items() if k != "until"}
            params, _ = self._generation(gen_kwargs, doc_id)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                    visuals = self._check_visuals(visuals)
                with self._selection():
                    outputs.append(self.engine.generate_text([self._prompt(context, visuals, doc_id)], params)[0])
                round_idx += 1
            out.append(outputs)
            self.cache_hook.add_partial("generate_until_multi_round", (req.args[0], gen_kwargs), outputs)
            bar.update(1)
        bar.close()
        return out

    # -- internals ------------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        return self._check_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _check_visuals(self, visuals) -> list:
        """The request's visuals as a list of at most one video path (file or frames folder)."""
        if visuals is None:
            return []
        if isinstance(visuals, (str, os.PathLike)):
            visuals = [visuals]
        visuals = [v for v in visuals if v is not None]
        for v in visuals:
            if not isinstance(v, (str, os.PathLike)):
                raise ValueError(
                    f"{MODEL_NAME} takes videos (a file path or a folder of frames) from doc_to_visual, "
                    f"got {type(v).__name__}; images and audio are not supported"
                )
            if os.path.splitext(os.fspath(v))[1].lower() in IMAGE_EXTENSIONS:
                raise ValueError(f"{MODEL_NAME} takes videos or frame folders from doc_to_visual, got the image {v!r}")
        if len(visuals) > 1:
            raise ValueError(f"{MODEL_NAME} takes one video per prompt, doc_to_visual gave {len(visuals)}")
        return visuals

    @staticmethod
    def _video_key(visuals: list) -> str:
        return os.fspath(visuals[0]) if visuals else ""

    def _clip(self, path) -> VideoClip:
        key = os.path.abspath(os.fspath(path))
        clip = self._clips.get(key)
        if clip is None:
            clip = self._clips[key] = load_video(key, self.sampling)
            while len(self._clips) > CLIP_CACHE_SIZE:
                self._clips.popitem(last=False)
        else:
            self._clips.move_to_end(key)
        return clip

    def _prompt(self, context: str, visuals: list, doc_id) -> Prompt:
        video = self._clip(visuals[0]) if visuals else None
        text = _PLACEHOLDER.sub("", context) if video is not None else context
        seed = doc_id if isinstance(doc_id, int) else 0
        return Prompt(user=text, system=self.system_prompt, video=video, seed=seed)

    def _generation(self, gen_kwargs: dict | None, doc_id) -> tuple[GenerationParams, list[str]]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
        max_new = gen_kwargs.get("max_new_tokens") or self.max_new_tokens
        # transformers' semantics: do_sample=false is greedy whatever the temperature; do_sample=true samples at the
        # given temperature (1 when none is given); without do_sample, a temperature above 0 samples (as lmms-eval's
        # own Qwen adapters do)
        do_sample = gen_kwargs.get("do_sample")
        temperature = gen_kwargs.get("temperature")
        if do_sample is not None and not _as_bool(do_sample, "do_sample"):
            temperature = 0.0
        elif temperature is None:
            temperature = 1.0 if do_sample is not None else 0.0
        temperature = float(temperature)
        num_beams = gen_kwargs.get("num_beams") or 1
        if int(num_beams) > 1 and "num_beams" not in self._warned:
            self._warned.add("num_beams")
            log.warning("%s: num_beams=%s is not supported, decoding greedily / by sampling", MODEL_NAME, num_beams)
        params = GenerationParams(
            temperature=temperature,
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            top_k=int(gen_kwargs.get("top_k") or 0),
            max_new_tokens=_as_int(max_new, "max_new_tokens"),
            seed=self.seed,
        )
        return params, [u for u in until if u]

    def _encode(self, prompt: Prompt):
        engine = self.engine
        if prompt.video is not None and not engine.is_video_model:
            raise ValueError(f"{self.pretrained} is not a video model; it cannot take a video")
        vision_config = engine.model.config.vision_config if engine.is_video_model else None
        video_token_id = engine.video_token_id if engine.is_video_model else None
        return encode_prompt(engine.tokenizer, prompt, video_token_id, vision_config)

    def _score(self, encoded: Sequence[tuple[list[int], list[int], Any]]) -> list[tuple[float, bool]]:
        """One forward pass over a left-padded batch of [prompt + continuation]; the continuation sits at the end of
        every row (also after selection shortens the sequence), so the last len(cont)+1 logits score it."""
        engine = self.engine
        model = engine.model
        rows = [ids + cont for ids, cont, _ in encoded]
        length = max(len(r) for r in rows)
        if length > engine.cfg.max_model_len:
            raise ValueError(f"request of {length} tokens does not fit max_model_len={engine.cfg.max_model_len}")
        input_ids = torch.full((len(rows), length), engine.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        continuation = torch.zeros((len(rows), length), dtype=torch.bool)
        for row, (r, (_, cont, _)) in enumerate(zip(rows, encoded, strict=True)):
            input_ids[row, length - len(r) :] = torch.tensor(r)
            attention_mask[row, length - len(r) :] = 1
            if cont:
                continuation[row, length - len(cont) :] = True
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        videos = [v for _, _, v in encoded if v is not None]
        if videos:
            batch["pixel_values_videos"] = torch.cat([v.pixel_values_videos for v in videos]).to(model.dtype)
            batch["video_grid_thw"] = torch.cat([v.video_grid_thw for v in videos])
            batch["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos])
        if engine.is_video_model:
            batch["mm_token_type_ids"] = (
                2 * (input_ids == engine.video_token_id) + (input_ids == engine.image_token_id)
            ).int()
        else:
            batch["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if self.has_selector:
            # the selector's question: the text after the video, without padding and without the continuation
            vision = torch.isin(
                input_ids,
                torch.tensor([model.config.video_token_id, model.config.vision_start_token_id,
                              model.config.vision_end_token_id, model.config.image_token_id]),
            )
            pos = torch.arange(length)
            last_vision = torch.where(vision, pos, -1).amax(-1)
            batch["question_mask"] = (pos > last_vision[:, None]) & attention_mask.bool() & ~continuation
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        width = max(len(cont) for _, cont, _ in encoded) + 1
        with torch.inference_mode():
            logits = model(**batch, logits_to_keep=width).logits.float()  # [B, width, vocab]
        scores = []
        for row, (_, cont, _) in enumerate(encoded):
            if not cont:
                scores.append((0.0, True))
                continue
            n = len(cont)
            logprobs = logits[row, width - n - 1 : width - 1].log_softmax(-1)  # positions predicting cont
            target = torch.tensor(cont, device=logprobs.device)
            total = logprobs.gather(-1, target[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target).all().item())
            scores.append((float(total), greedy))
        return scores

    def _selection(self):
        return _SelectionSwitch(self.engine.model, self.selection) if self.has_selector else _Nothing()

    def _progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        disable = self.rank != 0 or os.environ.get("QTSPLUS_NO_PROGRESS") == "1"
        return tqdm(total=total, desc=f"{MODEL_NAME} {desc}", disable=disable)


class _SelectionSwitch:
    """Sets model.selection for one call and restores it: the engine (and so the model) is shared process-wide."""

    def __init__(self, model, selection: bool) -> None:
        self.model, self.selection = model, selection

    def __enter__(self) -> None:
        self.before = self.model.selection
        self.model.selection = self.selection

    def __exit__(self, *exc) -> None:
        self.model.selection = self.before


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _passes_through(score: tuple[float, bool]) -> bool:
    return unwrap_generation_output is None or unwrap_generation_output(score)[0] == score


# lmms-eval 0.7.x turns every response that is not a string into str(response), (-1.5, False) into "(-1.5, False)",
# so its own multiple_choice / loglikelihood scoring fails on any model ("too many values to unpack"). A
# GenerationResult's `text` is passed through as is: the scores travel in one where that is needed.
_WRAP_SCORES = not _passes_through((-1.5, False))


def _score_output(score: tuple[float, bool]):
    return GenerationResult(text=score) if _WRAP_SCORES else score  # type: ignore[arg-type]


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = len(text)
    for stop in until:
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end]


def lmms_eval_manifest():
    """lmms-eval's model manifest for ``qtsplus`` (a payload for the ``lmms_eval.models`` entry-point group)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def _register() -> None:
    """Make ``--model qtsplus`` resolvable: lmms-eval >= 0.7 looks models up in MODEL_REGISTRY_V2 (the
    ``register_model`` decorator above only fills the legacy registry); older versions in AVAILABLE_MODELS."""
    models = sys.modules.get("lmms_eval.models")
    if models is None:
        import lmms_eval.models as models
    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        registry.register_manifest(lmms_eval_manifest(), overwrite=True)
    available = getattr(models, "AVAILABLE_MODELS", None)
    if isinstance(available, dict):
        available[MODEL_NAME] = CLASS_PATH


_register()


def main(argv: Sequence[str] | None = None) -> None:
    """lmms-eval's command line with ``qtsplus`` registered: ``python -m qtsplus.evaluation.lmms_eval_adapter ...``."""
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    lmms_eval_main()


if __name__ == "__main__":  # run the imported module's main, whose class is the registered one
    from qtsplus.evaluation.lmms_eval_adapter import main as _main

    _main()
