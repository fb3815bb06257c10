"""The one definition of every record the pipeline writes.

Each record kind is a pydantic model. Everything else is derived from it:
- the Parquet (pyarrow) schema of its shards: `arrow_schema(Model)`;
- the JSON schema that constrains the LLM's output: `schemas.generation.vscq1_generation_schema`;
- the Hugging Face `datasets.Features` a shard loads with: `datasets.Features.from_arrow_schema(arrow_schema(Model))`.

Bump SCHEMA_VERSION whenever a field is added, removed or changes meaning: it is written into every shard's
metadata and every manifest, and it is part of every stage's cache key.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.1"  # 1.1: optional target_tokens (needle task) and target_recall

QUESTION_TYPES: tuple[str, ...] = (
    "object_identity",
    "attribute_color_material_shape",
    "text_in_scene",
    "count_quantity",
    "action_activity",
    "setting_location",
    "temporal_order",
    "person_attribute",
    "cause_effect_or_purpose",
)
OPTION_KEYS: tuple[str, ...] = ("A", "B", "C", "D")
DIFFICULTIES: tuple[str, ...] = ("easy", "medium", "hard")
PARTITIONS: tuple[str, ...] = ("train", "eval")

QuestionType = Literal[QUESTION_TYPES]  # type: ignore[valid-type]
OptionKey = Literal[OPTION_KEYS]  # type: ignore[valid-type]
Difficulty = Literal[DIFFICULTIES]  # type: ignore[valid-type]
Partition = Literal[PARTITIONS]  # type: ignore[valid-type]
NonEmpty = Annotated[str, Field(min_length=1)]


class Record(BaseModel):
    """Base of all records: strict fields, no extras."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Options(Record):
    """The four options of a single-choice question, keyed A-D."""

    A: NonEmpty
    B: NonEmpty
    C: NonEmpty
    D: NonEmpty


class OptionProbs(Record):
    """A probability per option key (sums to 1)."""

    A: float
    B: float
    C: float
    D: float


class Caption(Record):
    """One ingested video caption (stage `captions`)."""

    video_id: str
    video: str = Field(description="video path relative to the declared video root (file or folder of frames)")
    caption: str
    partition: Partition
    source_row: int = Field(description="0-based row (line) of the input file this record came from")
    duration_s: float | None = None
    num_frames: int | None = None


class GeneratedQuestion(Record):
    """What the text LLM writes for one question (the unit of the VSCQ1 generation schema)."""

    question_type: QuestionType
    question: NonEmpty
    options: Options
    answer: OptionKey
    difficulty: Difficulty
    rationale: NonEmpty
    evidence: NonEmpty


class VSCQ1Question(Record):
    """A validated visual single-choice question (stage `vscq1`); options already shuffled."""

    question_id: str
    video_id: str
    video: str
    partition: Partition
    question_type: QuestionType
    question: str
    options: Options
    answer: OptionKey
    difficulty: Difficulty
    rationale: str
    evidence: str
    target_tokens: list[int] | None = Field(
        None, description="visual-token indices that hold what the question asks about, when known by construction "
        "(the needle task, qtsplus.needle); None for generated questions")


class VSCQ2Question(VSCQ1Question):
    """A VSCQ1 question answered by the video teacher (stage `vscq2`: splits kept / screened_out)."""

    teacher_answer: OptionKey
    teacher_probs: OptionProbs
    correct: bool


class VQAAnswer(Record):
    """A free-form teacher answer to a kept question (stage `vqa`)."""

    question_id: str
    video_id: str
    video: str
    partition: Partition
    question_type: QuestionType
    difficulty: Difficulty
    question: str
    answer_key: OptionKey = Field(description="the teacher-validated option key of the MCQ form of this question")
    prediction: str = Field(description="the teacher's free-form answer")
    target_tokens: list[int] | None = Field(None, description="as VSCQ1Question.target_tokens")


class Reject(Record):
    """Anything that did not make it through a stage, with the reason (split `rejects` of every stage)."""

    stage: str
    chunk: int
    level: Literal["row", "question"] = Field(
        description="row: a whole input row was rejected; question: one generated question of an accepted row"
    )
    source_row: int | None
    record_id: str | None
    reason: str
    detail: str
    raw: str = Field(description="the offending input, truncated to RAW_MAX_CHARS")


class EvalPrediction(Record):
    """One method's answer to one held-out question (evaluate: predictions.parquet)."""

    method: str
    task: Literal["mcq", "vqa"]
    question_id: str
    video_id: str
    question_type: QuestionType
    difficulty: Difficulty
    reference: str = Field(description="mcq: the teacher-validated key; vqa: the teacher's answer")
    prediction: str = Field(description="mcq: the chosen option key; vqa: the generated answer")
    correct: bool | None = Field(description="mcq only")
    option_probs: OptionProbs | None = Field(description="mcq only: softmax over the option-letter logits")
    rouge_l: float | None = Field(description="vqa only: ROUGE-L F1 against the teacher's answer")
    video_tokens_in: int = Field(description="visual tokens the vision tower produced (M)")
    budget: int | None = Field(description="visual tokens the method was allowed (None: its own choice)")
    video_tokens_kept: int = Field(description="visual tokens that reached the LM")
    lm_tokens: int = Field(description="length of the sequence the LM prefilled")
    rho: float | None = Field(description="QTSplus's predicted retention fraction")
    latency_s: float = Field(description="mcq: the scoring forward; vqa: time to the full answer")
    target_recall: float | None = Field(None, description="share of the question's target_tokens among the visual "
                                        "token slots that reached the LM (None: no target_tokens)")


RAW_MAX_CHARS = 2000

RECORD_TYPES: dict[str, type[Record]] = {
    "caption": Caption,
    "vscq1": VSCQ1Question,
    "vscq2": VSCQ2Question,
    "vqa": VQAAnswer,
    "reject": Reject,
    "eval_prediction": EvalPrediction,
}


def _arrow_type(annotation: object) -> tuple[pa.DataType, bool]:
    """Map a field annotation to (arrow type, nullable)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _arrow_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation!r}")
        return _arrow_type(args[0])[0], True
    if origin is Literal:
        kinds = {type(v) for v in get_args(annotation)}
        if kinds != {str}:
            raise TypeError(f"only string literals are supported, got {annotation!r}")
        return pa.string(), False
    if origin is list:
        return pa.list_(_arrow_type(get_args(annotation)[0])[0]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(_arrow_fields(annotation)), False
    simple = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if annotation in simple:
        return simple[annotation], False
    raise TypeError(f"no arrow type for {annotation!r}")


def _arrow_fields(model: type[BaseModel]) -> list[pa.Field]:
    hints = typing.get_type_hints(model, include_extras=True)
    fields = []
    for name in model.model_fields:
        dtype, nullable = _arrow_type(hints[name])
        fields.append(pa.field(name, dtype, nullable=nullable))
    return fields


def arrow_schema(model: type[Record]) -> pa.Schema:
    """The Parquet schema of a record kind, with the schema version and kind in its metadata."""
    return pa.schema(
        _arrow_fields(model),
        metadata={b"qtsplus.schema_version": SCHEMA_VERSION.encode(), b"qtsplus.record": model.__name__.encode()},
    )


def to_table(model: type[Record], rows: list[Record]) -> pa.Table:
    """Records of one kind to an Arrow table with exactly the declared schema."""
    for row in rows:
        if not isinstance(row, model):
            raise TypeError(f"expected {model.__name__}, got {type(row).__name__}")
    return pa.Table.from_pylist([r.model_dump() for r in rows], schema=arrow_schema(model))
