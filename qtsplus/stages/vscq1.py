"""Stage VSCQ1: a text LLM turns each caption into N visual single-choice questions.

Validation: the output must match the generation schema, have four distinct non-empty options and a key in A-D.
Options are then shuffled so that the answer keys of a chunk are balanced: the keys A-D are dealt round-robin in a
seeded random order (each key within one of m/4 for m questions), and the distractors fill the other keys in a
seeded random order per question.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from qtsplus.checkpoints import model_code
from qtsplus.engines import EngineConfig, GenerationParams, Prompt, engine_python, get_engine
from qtsplus.fingerprint import canonical, code_fingerprint
from qtsplus.prompts import VSCQ1, vscq1_user_prompt
from qtsplus.shards import ChunkResult, ShardFile, read_rows, write_chunk_shards
from qtsplus.stages.common import engine_info, engine_settings, make_reject, stable_seed
from schemas import OPTION_KEYS, Caption, GeneratedQuestion, Reject, VSCQ1Question, vscq1_generation_schema

STAGE = "vscq1"


class Vscq1Config(BaseModel):
    """Stage VSCQ1: the question writer and how it is asked."""

    engine: EngineConfig
    generation: GenerationParams = GenerationParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=4096)
    n_questions: int = Field(3, ge=1, le=16)
    max_field_chars: int = Field(300, ge=8, description="max characters of every free-text field")
    shuffle_seed: int = 0


def depends_on(cfg: Vscq1Config) -> dict[str, Any]:
    """What a VSCQ1 chunk depends on besides its captions: the cache key and the manifest's provenance."""
    return {"engine": engine_settings(cfg.engine), "prompt_version": VSCQ1.version,
            "parameters": canonical(cfg.generation) | {"n_questions": cfg.n_questions,
                                                        "max_field_chars": cfg.max_field_chars,
                                                        "shuffle_seed": cfg.shuffle_seed},
            "code_version": code_fingerprint(run_vscq1_chunk, *model_code(cfg.engine.model_id),
                                             python=engine_python(cfg.engine))}


def question_problem(q: GeneratedQuestion) -> tuple[str, str] | None:
    """(reason, detail) when a schema-valid question is still unusable, else None."""
    if not q.question.strip():
        return "empty_question", "question is blank"
    options = [getattr(q.options, k).strip() for k in OPTION_KEYS]
    if any(not o for o in options):
        return "empty_option", "an option is blank"
    if len({o.casefold() for o in options}) < len(options):
        return "duplicate_options", "options are not distinct: " + " | ".join(options)
    return None


def balanced_keys(m: int, rng: random.Random) -> list[str]:
    """m answer keys with every key used floor(m/4) or ceil(m/4) times, in random order."""
    keys = list(OPTION_KEYS) * (m // len(OPTION_KEYS)) + rng.sample(OPTION_KEYS, m % len(OPTION_KEYS))
    rng.shuffle(keys)
    return keys


def shuffle_options(q: GeneratedQuestion, target: str, rng: random.Random) -> tuple[dict[str, str], str]:
    """Move the correct option to key `target`; the distractors take the other keys in random order."""
    options = {k: getattr(q.options, k).strip() for k in OPTION_KEYS}
    correct = options[q.answer]
    distractors = [options[k] for k in OPTION_KEYS if k != q.answer]
    rng.shuffle(distractors)
    shuffled = {}
    for key in OPTION_KEYS:
        shuffled[key] = correct if key == target else distractors.pop()
    return shuffled, target


def run_vscq1_chunk(out: Path, chunk: int, captions_files: list[ShardFile], cfg: Vscq1Config, input_fp: str) -> ChunkResult:
    """Generate, validate and shuffle the questions of one chunk of captions; write its shards."""
    captions = list(read_rows(out, captions_files, Caption))
    schema = vscq1_generation_schema(cfg.n_questions, cfg.max_field_chars)
    results = []
    engine = None
    if captions:
        engine = get_engine(cfg.engine)
        prompts = [
            Prompt(user=vscq1_user_prompt(c.caption, cfg.n_questions), system=VSCQ1.system,
                   seed=stable_seed(cfg.generation.seed, c.video_id))
            for c in captions
        ]
        results = engine.generate_json(prompts, schema, cfg.generation)

    rejects: list[Reject] = []
    valid: list[tuple[Caption, int, GeneratedQuestion]] = []
    kept_rows = 0
    for caption, res in zip(captions, results, strict=True):
        items = res.value.get("questions") if isinstance(res.value, dict) else None
        if res.error is not None or not isinstance(items, list):
            rejects.append(make_reject(STAGE, chunk, "unparseable_output", res.error or "no 'questions' list",
                                       res.text, source_row=caption.source_row, record_id=caption.video_id))
            continue
        good = 0
        for j, item in enumerate(items):
            qid = f"{caption.video_id}-q{j}"
            try:
                q = GeneratedQuestion.model_validate(item)
            except ValidationError as err:
                problem: tuple[str, str] | None = ("schema_violation", str(err).splitlines()[0])
            else:
                problem = question_problem(q)
            if problem:
                rejects.append(make_reject(STAGE, chunk, problem[0], problem[1], repr(item), level="question",
                                           source_row=caption.source_row, record_id=qid))
                continue
            valid.append((caption, j, q))
            good += 1
        if good:
            kept_rows += 1
        else:
            rejects.append(make_reject(STAGE, chunk, "no_valid_questions", f"0 of {len(items)} questions usable",
                                       res.text, source_row=caption.source_row, record_id=caption.video_id))

    rng = random.Random(stable_seed(cfg.shuffle_seed, input_fp))
    targets = balanced_keys(len(valid), rng)
    by_part: dict[str, list[VSCQ1Question]] = {"train": [], "eval": []}
    for (caption, j, q), target in zip(valid, targets, strict=True):
        qid = f"{caption.video_id}-q{j}"
        options, answer = shuffle_options(q, target, random.Random(stable_seed(cfg.shuffle_seed, qid)))
        by_part[caption.partition].append(VSCQ1Question(
            question_id=qid, video_id=caption.video_id, video=caption.video, partition=caption.partition,
            question_type=q.question_type, question=q.question.strip(), options=options,  # type: ignore[arg-type]
            answer=answer,  # type: ignore[arg-type]
            difficulty=q.difficulty, rationale=q.rationale.strip(), evidence=q.evidence.strip(),
        ))
    files = write_chunk_shards(out, STAGE, chunk, {
        "train": (VSCQ1Question, by_part["train"]), "eval": (VSCQ1Question, by_part["eval"]), "rejects": (Reject, rejects),
    })
    row_rejects = sum(r.level == "row" for r in rejects)
    stats = Counter({f"key_{k}": 0 for k in OPTION_KEYS})
    stats.update(f"key_{t}" for t in targets)
    stats.update(f"type_{q.question_type}" for _, _, q in valid)
    stats.update(f"difficulty_{q.difficulty}" for _, _, q in valid)
    stats["questions"] = len(valid)
    return ChunkResult(
        stage=STAGE, chunk=chunk, input_fingerprint=input_fp, files=files, read=len(captions), kept=kept_rows,
        rejected=row_rejects,
        outcomes={k: len(v) for k, v in by_part.items() if v} | ({"rejects": len(rejects)} if rejects else {}),
        reasons=dict(Counter(r.reason for r in rejects)), stats=dict(stats), engine=engine_info(engine),
    )
