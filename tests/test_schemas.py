"""One definition per record: Parquet schemas and generation schemas derive from the pydantic models."""

from __future__ import annotations

import random
import typing

import pyarrow as pa
import pytest
from pydantic import ValidationError

from qtsplus.engines.null_engine import synthesize
from qtsplus.prompts import MCQ, QUESTION_TYPE_GUIDE, VSCQ1, mcq_user_prompt
from schemas import (
    QUESTION_TYPES,
    RECORD_TYPES,
    SCHEMA_VERSION,
    GeneratedQuestion,
    VSCQ2Question,
    arrow_schema,
    to_table,
    vscq1_generation_schema,
)


@pytest.mark.parametrize("kind", sorted(RECORD_TYPES))
def test_arrow_schema_has_every_field_and_the_version(kind: str) -> None:
    model = RECORD_TYPES[kind]
    schema = arrow_schema(model)
    assert schema.names == list(model.model_fields)
    assert schema.metadata[b"qtsplus.schema_version"] == SCHEMA_VERSION.encode()
    for name, field in model.model_fields.items():
        assert schema.field(name).nullable == (type(None) in typing.get_args(field.annotation))


def test_nested_structs_and_table_round_trip() -> None:
    schema = arrow_schema(VSCQ2Question)
    assert schema.field("options").type == pa.struct([pa.field(k, pa.string(), nullable=False) for k in "ABCD"])
    assert schema.field("teacher_probs").type.field("A").type == pa.float64()
    row = VSCQ2Question(question_id="v-q0", video_id="v", video="v.mp4", partition="train", question_type="count_quantity",
                        question="How many?", options={"A": "1", "B": "2", "C": "3", "D": "4"}, answer="B",
                        difficulty="easy", rationale="r", evidence="e", teacher_answer="B",
                        teacher_probs={"A": 0.1, "B": 0.7, "C": 0.1, "D": 0.1}, correct=True)
    table = to_table(VSCQ2Question, [row])
    assert VSCQ2Question.model_validate(table.to_pylist()[0]) == row


def test_generation_schema_bounds_and_validates_with_the_record_model() -> None:
    schema = vscq1_generation_schema(3, 40)
    items = schema["properties"]["questions"]
    assert items["minItems"] == items["maxItems"] == 3
    props = items["items"]["properties"]
    assert props["question_type"]["enum"] == list(QUESTION_TYPES)
    assert props["answer"]["enum"] == ["A", "B", "C", "D"]
    assert props["question"] == {"type": "string", "minLength": 1, "maxLength": 40}
    assert props["options"]["required"] == ["A", "B", "C", "D"] and props["options"]["additionalProperties"] is False
    for seed in range(20):  # every instance of the schema is a valid GeneratedQuestion
        value = synthesize(schema, random.Random(seed))
        assert [GeneratedQuestion.model_validate(q).answer in "ABCD" for q in value["questions"]] == [True] * 3
    with pytest.raises(ValidationError):
        GeneratedQuestion.model_validate(value["questions"][0] | {"answer": "E"})
    with pytest.raises(ValueError):
        vscq1_generation_schema(0, 40)


def test_prompts_are_versioned_by_content() -> None:
    assert set(QUESTION_TYPE_GUIDE) == set(QUESTION_TYPES)
    assert VSCQ1.version.startswith("vscq1-v1+") and MCQ.version != VSCQ1.version
    text = mcq_user_prompt("What is red?", {"A": "car", "B": "bike", "C": "tree", "D": "sky"})
    assert text.splitlines()[1:5] == ["A. car", "B. bike", "C. tree", "D. sky"]
    assert text.endswith("Please provide your options (only A or B or C or D) directly. Do not give any other responses.")
