"""Record definitions (pydantic) and everything derived from them: Parquet schemas and generation JSON schemas."""

from schemas.generation import max_json_chars, question_item_schema, vscq1_generation_schema
from schemas.records import (
    DIFFICULTIES,
    OPTION_KEYS,
    PARTITIONS,
    QUESTION_TYPES,
    RAW_MAX_CHARS,
    RECORD_TYPES,
    SCHEMA_VERSION,
    Caption,
    EvalPrediction,
    GeneratedQuestion,
    OptionProbs,
    Options,
    Record,
    Reject,
    VQAAnswer,
    VSCQ1Question,
    VSCQ2Question,
    arrow_schema,
    to_table,
)

__all__ = [
    "DIFFICULTIES", "OPTION_KEYS", "PARTITIONS", "QUESTION_TYPES", "RAW_MAX_CHARS", "RECORD_TYPES", "SCHEMA_VERSION",
    "Caption", "EvalPrediction", "GeneratedQuestion", "OptionProbs", "Options", "Record", "Reject", "VQAAnswer", "VSCQ1Question",
    "VSCQ2Question", "arrow_schema", "to_table", "max_json_chars", "question_item_schema", "vscq1_generation_schema",
]
