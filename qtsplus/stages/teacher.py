"""Stages VSCQ2 and QTS-VQA: the video teacher screens the questions and answers them in free form."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from qtsplus.checkpoints import model_code
from qtsplus.engines import EngineConfig, GenerationParams, Prompt, engine_python, get_engine
from qtsplus.fingerprint import canonical, code_fingerprint
from qtsplus.prompts import MCQ, mcq_user_prompt, vqa_user_prompt
from qtsplus.prompts import VQA as VQA_PROMPT
from qtsplus.shards import ChunkResult, ShardFile, read_rows, write_chunk_shards
from qtsplus.stages.common import engine_info, engine_settings, make_reject, ready_groups, stable_seed
from qtsplus.video import SamplingConfig
from schemas import OPTION_KEYS, OptionProbs, Reject, VQAAnswer, VSCQ1Question, VSCQ2Question

VSCQ2 = "vscq2"
VQA = "vqa"


class TeacherConfig(BaseModel):
    """The video teacher (Qwen2.5-VL) of stages VSCQ2 and QTS-VQA."""

    engine: EngineConfig
    video: SamplingConfig = SamplingConfig()
    vqa_generation: GenerationParams = GenerationParams(temperature=0.0, max_new_tokens=128)
    group_size: int = Field(32, ge=1, description="questions decoded and sent to the engine together")


def depends_on_vscq2(cfg: TeacherConfig, video_root: str) -> dict[str, Any]:
    """What a VSCQ2 chunk depends on besides its questions (not the VQA settings: changing them keeps VSCQ2)."""
    return {"engine": engine_settings(cfg.engine), "prompt_version": MCQ.version, "video_root": video_root,
            "video_sampling": canonical(cfg.video), "group_size": cfg.group_size,
            "parameters": {"scoring": "option-letter probabilities"},
            "code_version": code_fingerprint(run_vscq2_chunk, *model_code(cfg.engine.model_id),
                                             python=engine_python(cfg.engine))}


def depends_on_vqa(cfg: TeacherConfig, video_root: str) -> dict[str, Any]:
    """What a QTS-VQA chunk depends on besides the kept questions."""
    return {"engine": engine_settings(cfg.engine), "prompt_version": VQA_PROMPT.version, "video_root": video_root,
            "video_sampling": canonical(cfg.video), "group_size": cfg.group_size,
            "parameters": canonical(cfg.vqa_generation),
            "code_version": code_fingerprint(run_vqa_chunk, *model_code(cfg.engine.model_id),
                                             python=engine_python(cfg.engine))}


def run_vscq2_chunk(
    out: Path, chunk: int, files: list[ShardFile], cfg: TeacherConfig, video_root: Path, input_fp: str
) -> ChunkResult:
    """The teacher answers each question from the video (option-letter probabilities at the last position);
    correct answers go to `<partition>_kept`, wrong ones to `<partition>_screened_out`."""
    questions = list(read_rows(out, files, VSCQ1Question))
    splits: dict[str, list[VSCQ2Question]] = {f"{p}_{o}": [] for p in ("train", "eval") for o in ("kept", "screened_out")}
    rejects: list[Reject] = []
    engine = None
    for ready in ready_groups(questions, video_root, cfg.video, cfg.group_size, VSCQ2, chunk, rejects):
        engine = engine or get_engine(cfg.engine)
        prompts = [Prompt(user=mcq_user_prompt(q.question, q.options.model_dump()), video=clip) for q, clip in ready]
        choices = engine.choose(prompts, OPTION_KEYS)
        for (q, _), res in zip(ready, choices, strict=True):
            correct = res.choice == q.answer
            rec = VSCQ2Question(**q.model_dump(), teacher_answer=res.choice, teacher_probs=OptionProbs(**res.probs),
                                correct=correct)
            splits[f"{q.partition}_{'kept' if correct else 'screened_out'}"].append(rec)
    outputs = {name: (VSCQ2Question, rows) for name, rows in splits.items()}
    files_out = write_chunk_shards(out, VSCQ2, chunk, outputs | {"rejects": (Reject, rejects)})
    kept = sum(len(v) for v in splits.values())
    return ChunkResult(
        stage=VSCQ2, chunk=chunk, input_fingerprint=input_fp, files=files_out, read=len(questions), kept=kept,
        rejected=len(rejects),
        outcomes={k: len(v) for k, v in splits.items() if v} | ({"rejects": len(rejects)} if rejects else {}),
        reasons=dict(Counter(r.reason for r in rejects)), engine=engine_info(engine),
        stats={"correct": sum(len(v) for k, v in splits.items() if k.endswith("_kept")),
               "wrong": sum(len(v) for k, v in splits.items() if k.endswith("_screened_out"))},
    )


def run_vqa_chunk(
    out: Path, chunk: int, files: list[ShardFile], cfg: TeacherConfig, video_root: Path, input_fp: str
) -> ChunkResult:
    """The teacher writes a short free-form answer to each kept question."""
    questions = list(read_rows(out, files, VSCQ2Question))
    by_part: dict[str, list[VQAAnswer]] = {"train": [], "eval": []}
    rejects: list[Reject] = []
    engine = None
    for ready in ready_groups(questions, video_root, cfg.video, cfg.group_size, VQA, chunk, rejects):
        engine = engine or get_engine(cfg.engine)
        prompts = [Prompt(user=vqa_user_prompt(q.question), video=clip, seed=stable_seed(q.question_id))
                   for q, clip in ready]
        answers = engine.generate_text(prompts, cfg.vqa_generation)
        for (q, _), text in zip(ready, answers, strict=True):
            text = text.strip()
            if not text:
                rejects.append(make_reject(VQA, chunk, "empty_answer", "the teacher wrote nothing",
                                           q.model_dump_json(), record_id=q.question_id))
                continue
            by_part[q.partition].append(VQAAnswer(
                question_id=q.question_id, video_id=q.video_id, video=q.video, partition=q.partition,
                question_type=q.question_type, difficulty=q.difficulty, question=q.question, answer_key=q.answer,
                prediction=text,
            ))
    files_out = write_chunk_shards(out, VQA, chunk, {
        "train": (VQAAnswer, by_part["train"]), "eval": (VQAAnswer, by_part["eval"]), "rejects": (Reject, rejects),
    })
    kept = sum(len(v) for v in by_part.values())
    return ChunkResult(
        stage=VQA, chunk=chunk, input_fingerprint=input_fp, files=files_out, read=len(questions), kept=kept,
        rejected=len(rejects),
        outcomes={k: len(v) for k, v in by_part.items() if v} | ({"rejects": len(rejects)} if rejects else {}),
        reasons=dict(Counter(r.reason for r in rejects)), engine=engine_info(engine),
    )
