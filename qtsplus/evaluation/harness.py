"""The evaluation harness: every method through the same engine, prompts, videos, splice and LM.

A method is a name. `teacher` is the base model without selection, `no_selection` the checkpoint with its selector
off, `qtsplus` the checkpoint's selector with its own adaptive budget; any other name is a selector of
`qtsplus.selectors` (uniform_frames, random_tokens, flexselect, vqtoken, ... or one registered later), run in place
of the QTSplus selector through `QTSplusForConditionalGeneration.use_method`. Comparators get, per question, the
number of visual tokens QTSplus kept for it (equal budgets), or `EvalConfig.budget` when QTSplus is not evaluated.
A checkpoint trained with another method (train-selector's `method`: flexselect_lite, vqtoken) holds that method as
its own selector: its name (and `qtsplus`, read as "the checkpoint's own selector") runs the trained weights at the
checkpoint's trained budget, and the comparators get its kept counts. Samples run one at a time (batch 1), as latency
is measured per sample.

With `EvalConfig.features`, the MCQ forward of the checkpoint's methods (qtsplus, no_selection and the comparators)
takes the video's cached vision features (`video_embeds`) when a lossless feature set of exactly this vision tower holds
them: the numbers are the same, the vision tower does not run (and is not in the measured latency). The teacher (a
stock model), the VQA generations and the latency sweep always decode the video.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from qtsplus.engines import EngineConfig, GenerationParams, Prompt
from qtsplus.engines.chat import option_token_ids
from qtsplus.engines.transformers_engine import TransformersEngine
from qtsplus.evaluation.config import NO_SELECTION, QTSPLUS, QTSPLUS_NO_TIME, TEACHER, EvalConfig
from qtsplus.evaluation.metrics import rouge_l
from qtsplus.features.store import open_feature_set, video_prompt_ids
from qtsplus.prompts import mcq_user_prompt, vqa_user_prompt
from qtsplus.shards import load_manifest, read_rows
from qtsplus.video import SamplingConfig, VideoClip, load_video, resolve_video_path
from schemas import OPTION_KEYS, EvalPrediction, OptionProbs, VQAAnswer, VSCQ2Question


def teacher_sampling(data: Path) -> SamplingConfig:
    """The frame sampling the teacher used in stage VSCQ2 (so `teacher` reproduces its answers exactly)."""
    return SamplingConfig(**load_manifest(data, "vscq2").provenance["video_sampling"])


def teacher_model_id(checkpoint: Path) -> str:
    record = checkpoint / "qtsplus_training.json"
    if not record.is_file():
        raise ValueError(f"{checkpoint}: no qtsplus_training.json; set EvalConfig.teacher_model")
    data = json.loads(record.read_text())
    return data.get("teacher_model", data["base_model"])


@dataclass
class MethodRun:
    """How to run one method: the engine, and a context that configures its model for the method."""

    engine: TransformersEngine
    configure: Callable[[int | None], object]  # budget (tokens) -> context manager


def _peak_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Harness:
    """Loads the checkpoint once (and the teacher when asked) and answers questions with any method."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.data = Path(cfg.data)
        self.sampling = cfg.video or teacher_sampling(self.data)
        self.video_root = Path(cfg.video_root or load_manifest(self.data, "captions").provenance["video_root"])
        engine_cfg = EngineConfig(model_id=cfg.checkpoint, batch_size=1, device=cfg.device, dtype=cfg.dtype)
        self.engine = TransformersEngine(engine_cfg)
        if not hasattr(self.engine.model, "use_method"):
            raise ValueError(f"{cfg.checkpoint} is not a QTSplus checkpoint (model type "
                             f"{self.engine.model.config.model_type})")
        self.engine.model.eval()
        self._teacher: TransformersEngine | None = None
        self.fresh_weights: set[str] = set()  # borrowed methods run with weights this checkpoint never trained
        self._clips: dict[tuple[str, SamplingConfig], VideoClip] = {}
        self.features = open_feature_set(cfg.features, self.data, self.sampling, self.engine.model.model.visual,
                                         lossless=True)

    # --- methods ---------------------------------------------------------------------------------------------------
    def teacher(self) -> TransformersEngine:
        if self._teacher is None:
            model_id = self.cfg.teacher_model or teacher_model_id(Path(self.cfg.checkpoint))
            self._teacher = TransformersEngine(EngineConfig(model_id=model_id, batch_size=1, device=self.cfg.device,
                                                            dtype=self.cfg.dtype))
        return self._teacher

    @property
    def own_method(self) -> str:
        """The checkpoint's own selector: `qtsplus`, or the method it was trained with (flexselect_lite, vqtoken)."""
        model = self.engine.model
        return QTSPLUS if model.uses_qtsplus else model.config.selection_method

    def methods(self) -> list[str]:
        """`cfg.methods` in run order, `qtsplus` read as the checkpoint's own selector (its trained method when it
        holds another): the checkpoint's own selector first, its kept counts are the others' budgets."""
        own = self.own_method
        named = [own if m == QTSPLUS else m for m in self.cfg.methods]
        if own != QTSPLUS and QTSPLUS in self.cfg.methods:
            print(f"{self.cfg.checkpoint} holds a trained {own} selector: 'qtsplus' in methods evaluates it as {own}")
        return ordered_methods(named, own=own)

    def method(self, name: str, fixed_budget: bool = False) -> MethodRun:
        """How to run `name`. `fixed_budget`: the checkpoint's own selector at the budget each call gives (for
        `EvalConfig.budgets`) rather than its own; QTSPLUS_NO_TIME is always at the given budget."""
        model = self.engine.model
        if name == TEACHER:
            return MethodRun(self.teacher(), lambda budget: _nothing())
        if name == NO_SELECTION:
            return MethodRun(self.engine, lambda budget: _attr(model, selection=False))
        if name == QTSPLUS_NO_TIME:
            if not model.uses_qtsplus:
                raise ValueError(f"{QTSPLUS_NO_TIME} needs a QTSplus checkpoint; {self.cfg.checkpoint} holds "
                                 f"{self.own_method}")
            return self.borrowed(_qtsplus_at_budget(_without_time(model.selector)))
        if name == self.own_method and fixed_budget:  # the trained selector at the budget it is given
            return self.borrowed(_qtsplus_at_budget(model.selector) if model.uses_qtsplus else model.selector)
        if name == self.own_method:  # the trained selector, at its own (adaptive, or trained) budget
            return MethodRun(self.engine, lambda budget: _attr(model, selection=True))
        if name == QTSPLUS:
            raise ValueError(f"{self.cfg.checkpoint} holds a {self.own_method} selector, not QTSplus")
        from qtsplus.selectors import build_selector

        selector = build_selector(name, model.config.text_config, **self.cfg.method_options.get(name, {}))
        selector.to(model.device, model.dtype).eval()
        if any(True for _ in selector.parameters()):
            self.fresh_weights.add(name)
        return self.borrowed(selector)

    def borrowed(self, selector) -> MethodRun:
        """Run `selector` (a `qtsplus.selectors.Selector`) in place of the checkpoint's own, through `use_method`."""
        model = self.engine.model
        fallback = self.cfg.budget

        @contextmanager
        def configure(budget: int | float | None):
            model.use_method(selector, budget if budget is not None else fallback)
            try:
                yield
            finally:
                model.use_method(None)

        return MethodRun(self.engine, configure)

    # --- inputs ----------------------------------------------------------------------------------------------------
    def clip(self, video: str, sampling: SamplingConfig | None = None) -> VideoClip:
        sampling = sampling or self.sampling
        key = (video, sampling)
        if key not in self._clips:
            if len(self._clips) >= 64:  # questions are grouped by video: a small cache suffices
                self._clips.pop(next(iter(self._clips)))
            self._clips[key] = load_video(resolve_video_path(self.video_root, video), sampling)
        return self._clips[key]

    def mcq_questions(self) -> list[VSCQ2Question]:
        files = [f for f in load_manifest(self.data, "vscq2").files if f.split == self.cfg.mcq_split]
        rows = sorted(read_rows(self.data, files, VSCQ2Question), key=lambda q: (q.video, q.question_id))
        return rows[: self.cfg.max_mcq]

    def vqa_answers(self) -> list[VQAAnswer]:
        files = [f for f in load_manifest(self.data, "vqa").files if f.split == self.cfg.vqa_split]
        rows = sorted(read_rows(self.data, files, VQAAnswer), key=lambda a: (a.video, a.question_id))
        return rows[: self.cfg.max_vqa]

    # --- one sample --------------------------------------------------------------------------------------------------
    @staticmethod
    def token_stats(engine: TransformersEngine, batch: dict) -> dict:
        """Visual tokens in / kept and LM length of the last prefill (from the QTSplus model when it pruned)."""
        model = engine.model
        stats = getattr(model, "last_prefill", None)
        if stats is not None:
            return {k: (v[0] if isinstance(v, list) else v) for k, v in stats.items()}
        m = int((batch["input_ids"] == engine.video_token_id).sum())
        return {"video_tokens_in": m, "video_tokens_kept": m, "lm_tokens": int(batch["attention_mask"].sum()),
                "rho": None}

    def cached_batch(self, engine: TransformersEngine, user: str, video: str) -> dict | None:
        """The batch `engine.collate([engine.encode(prompt)])` would give, with the video's cached features in place
        of its pixels; None when the engine is not the checkpoint's or the video is not (verifiably) cached."""
        if self.features is None or engine is not self.engine:
            return None
        cached = self.features.get(resolve_video_path(self.video_root, video))
        if cached is None:
            return None
        ids = video_prompt_ids(engine.tokenizer, user, engine.video_token_id, cached.num_tokens)
        if len(ids) >= engine.cfg.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len={engine.cfg.max_model_len}")
        input_ids = torch.tensor([ids])
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                 "video_embeds": cached.features.to(engine.model.dtype), "video_grid_thw": cached.grid_thw,
                 "second_per_grid_ts": torch.tensor([cached.second_per_grid_t]),
                 "mm_token_type_ids": (2 * (input_ids == engine.video_token_id)
                                       + (input_ids == engine.image_token_id)).int()}
        return {k: v.to(engine.device) for k, v in batch.items()}

    def answer_mcq(self, run: MethodRun, q: VSCQ2Question, budget: int | float | None
                   ) -> tuple[EvalPrediction, dict]:
        engine = run.engine
        user = mcq_user_prompt(q.question, q.options.model_dump())
        batch = self.cached_batch(engine, user, q.video)
        if batch is None:
            batch = engine.collate([engine.encode(Prompt(user=user, video=self.clip(q.video)))])
        option_ids = torch.tensor(option_token_ids(engine.tokenizer, OPTION_KEYS), device=engine.device)
        with run.configure(budget), torch.inference_mode():
            _reset(engine)
            _peak_sync(engine.device)
            t0 = time.perf_counter()
            output = engine.model(**batch, logits_to_keep=1)
            logits = output.logits[:, -1, :].float()
            _peak_sync(engine.device)
            latency = time.perf_counter() - t0
            stats = self.token_stats(engine, batch)
        recall = target_recall(q.target_tokens, getattr(output, "selection", None))
        probs = dict(zip(OPTION_KEYS, logits[0, option_ids].softmax(-1).tolist(), strict=True))
        choice = max(probs, key=probs.__getitem__)
        return EvalPrediction(
            method="", task="mcq", question_id=q.question_id, video_id=q.video_id, question_type=q.question_type,
            difficulty=q.difficulty, reference=q.answer, prediction=choice, correct=choice == q.answer,
            option_probs=OptionProbs(**probs), rouge_l=None, budget=_tokens(budget), latency_s=latency,
            target_recall=recall, **stats,
        ), stats

    def answer_vqa(self, run: MethodRun, a: VQAAnswer, budget: int | float | None
                   ) -> tuple[EvalPrediction, dict]:
        engine = run.engine
        prompt = Prompt(user=vqa_user_prompt(a.question), video=self.clip(a.video))
        batch = engine.collate([engine.encode(prompt)])
        params = GenerationParams(temperature=0.0, max_new_tokens=self.cfg.vqa_max_new_tokens)
        with run.configure(budget):
            _reset(engine)
            _peak_sync(engine.device)
            t0 = time.perf_counter()
            (text,) = engine.generate_text([prompt], params)
            _peak_sync(engine.device)
            latency = time.perf_counter() - t0
            stats = self.token_stats(engine, batch)
        text = text.strip()
        return EvalPrediction(
            method="", task="vqa", question_id=a.question_id, video_id=a.video_id, question_type=a.question_type,
            difficulty=a.difficulty, reference=a.prediction, prediction=text, correct=None, option_probs=None,
            rouge_l=rouge_l(text, a.prediction), budget=_tokens(budget), latency_s=latency, **stats,
        ), stats


def target_recall(target_tokens: list[int] | None, selection) -> float | None:
    """Share of the target's visual-token indices among the slots that reached the LM (`selection.indices` where
    `token_mask`; a synthesized token counts at its anchor slot). No selection ran (teacher, no_selection): 1.0."""
    if not target_tokens:
        return None
    if selection is None:
        return 1.0
    kept = set(selection.indices[0][selection.token_mask[0]].tolist())  # batch 1
    return sum(t in kept for t in target_tokens) / len(target_tokens)


def _qtsplus_at_budget(selector):
    """A trained `QTSplusSelector` behind the selector contract, keeping exactly the budget it is given."""
    from qtsplus.selectors import QTSplusAdapter

    return QTSplusAdapter.wrap(selector, own_budget=False).eval()


def _without_time(selector):
    """A copy of a QTSplus selector whose re-encoder gets no time information (the time embedding zeroed)."""
    ablated = copy.deepcopy(selector)
    with torch.no_grad():
        ablated.reencoder.time.proj.weight.zero_()
    return ablated


def _tokens(budget: int | float | None) -> int | None:
    """A token-count budget as recorded before resolution (a ratio is resolved against M by the caller)."""
    return budget if isinstance(budget, int) else None


def budget_label(budget: float | int) -> str:
    """'10%' for a ratio of 0.1, '64' for a token count: the suffix of 'method@budget' names."""
    return f"{100 * budget:g}%" if isinstance(budget, float) else str(budget)


def _reset(engine: TransformersEngine) -> None:
    if hasattr(engine.model, "last_prefill"):
        engine.model.last_prefill = None


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _attr(obj: object, **values: object) -> Iterator[None]:
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def ordered_methods(methods: list[str], own: str = QTSPLUS) -> list[str]:
    """The checkpoint's own selector (QTSplus, or the method it was trained with) first: the comparators' budgets are
    the token counts it kept."""
    unknown = [m for m in methods if m not in (TEACHER, NO_SELECTION, QTSPLUS, QTSPLUS_NO_TIME)
               and not _is_selector(m)]
    if unknown:
        from qtsplus.selectors import SELECTORS

        raise ValueError(f"unknown methods {unknown}; known: {TEACHER}, {NO_SELECTION}, {QTSPLUS}, {QTSPLUS_NO_TIME}, "
                         f"{sorted(SELECTORS)}")
    return sorted(dict.fromkeys(methods), key=lambda m: (m != own, methods.index(m)))


def _is_selector(name: str) -> bool:
    from qtsplus.selectors import SELECTORS

    return name in SELECTORS


def run_predictions(harness: Harness, progress: Callable[[str, int, int], None] | None = None) -> list[EvalPrediction]:
    """Every method on every held-out MCQ and VQA sample (with `EvalConfig.budgets`: at every budget)."""
    cfg = harness.cfg
    if cfg.budgets:
        return run_at_budgets(harness, progress)
    mcq, vqa = harness.mcq_questions(), harness.vqa_answers()
    budgets: dict[tuple[str, str], int] = {}
    out: list[EvalPrediction] = []
    primary = harness.own_method
    for method in harness.methods():
        run = harness.method(method)
        own = method in (TEACHER, NO_SELECTION, primary)
        for task, items, answer in (("mcq", mcq, harness.answer_mcq), ("vqa", vqa, harness.answer_vqa)):
            if items:  # untimed warm-up: first calls pay for lazy initialisation, not for the method
                answer(run, items[0], budgets.get((task, items[0].question_id), 1) if not own else None)
            for i, item in enumerate(items):
                budget = None if own else budgets.get((task, item.question_id))
                pred, stats = answer(run, item, budget)
                if method == primary:
                    budgets[(task, item.question_id)] = int(stats["video_tokens_kept"])
                if not own and budget is None:  # the fallback budget, resolved against this sample's M
                    budget = _resolve(cfg.budget, int(stats["video_tokens_in"]))
                out.append(pred.model_copy(update={"method": method, "budget": budget}))
                if progress:
                    progress(f"{method} {task}", i + 1, len(items))
    return out


def run_at_budgets(harness: Harness, progress: Callable[[str, int, int], None] | None = None) -> list[EvalPrediction]:
    """`teacher` / `no_selection` once; the checkpoint's own selector once at its own budget; then every selecting
    method (the checkpoint's own selector included) once per budget of `cfg.budgets`, named 'method@budget'."""
    cfg = harness.cfg
    mcq, vqa = harness.mcq_questions(), harness.vqa_answers()
    out: list[EvalPrediction] = []
    runs: list[tuple[str, MethodRun, float | int | None]] = []
    for method in harness.methods():
        if method in (TEACHER, NO_SELECTION, harness.own_method):
            runs.append((method, harness.method(method), None))
        if method not in (TEACHER, NO_SELECTION):
            run = harness.method(method, fixed_budget=True)
            runs += [(f"{method}@{budget_label(b)}", run, b) for b in cfg.budgets]
    for label, run, fixed in runs:
        for task, items, answer in (("mcq", mcq, harness.answer_mcq), ("vqa", vqa, harness.answer_vqa)):
            if items:  # untimed warm-up
                answer(run, items[0], fixed)
            for i, item in enumerate(items):
                pred, stats = answer(run, item, fixed)
                budget = None if fixed is None else _resolve(fixed, int(stats["video_tokens_in"]))
                out.append(pred.model_copy(update={"method": label, "budget": budget}))
                if progress:
                    progress(f"{label} {task}", i + 1, len(items))
    return out


def _resolve(budget: float | int, m: int) -> int:
    from qtsplus.selectors.base import Budget

    return int(Budget.of(budget).resolve(torch.tensor([m]))[0])


def latency_sweep(harness: Harness, question: VSCQ2Question, frames: list[int], max_new_tokens: int) -> list[dict]:
    """Fig. 4: visual tokens into the LM and time to the full answer against frame count, with and without QTSplus."""
    rows = []
    params = GenerationParams(temperature=0.0, max_new_tokens=max_new_tokens)
    for n in frames:
        sampling = SamplingConfig(fps=1000.0, min_frames=n, max_frames=n, min_pixels=harness.sampling.min_pixels,
                                  max_pixels=harness.sampling.max_pixels)
        prompt = Prompt(user=mcq_user_prompt(question.question, question.options.model_dump()),
                        video=harness.clip(question.video, sampling))
        for method in (NO_SELECTION, harness.own_method):
            run = harness.method(method)
            batch = run.engine.collate([run.engine.encode(prompt)])
            with run.configure(None):
                run.engine.generate_text([prompt], params)  # untimed warm-up at this size
                _reset(run.engine)
                _peak_sync(run.engine.device)
                t0 = time.perf_counter()
                run.engine.generate_text([prompt], params)
                _peak_sync(run.engine.device)
                seconds = time.perf_counter() - t0
                stats = harness.token_stats(run.engine, batch)
            rows.append({"frames": n, "method": method, "seconds": seconds, **stats})
    return rows
