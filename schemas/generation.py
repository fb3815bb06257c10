"""JSON schemas that constrain LLM output, derived from the record definitions in `schemas.records`."""

from __future__ import annotations

import copy
from typing import Any

from schemas.records import GeneratedQuestion


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return _inline_refs(copy.deepcopy(defs[name]), defs)
        out = {}
        for key, value in node.items():
            if key == "properties":  # field names, not schema keywords: keep them all
                out[key] = {name: _inline_refs(sub, defs) for name, sub in value.items()}
            elif key not in ("$defs", "title", "description"):
                out[key] = _inline_refs(value, defs)
        return out
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _cap_strings(node: Any, max_chars: int) -> None:
    """Give every free string a maxLength (enums stay as they are) and forbid extra keys."""
    if isinstance(node, dict):
        if node.get("type") == "string" and "enum" not in node and "const" not in node:
            node["maxLength"] = min(node.get("maxLength", max_chars), max_chars)
        if node.get("type") == "object":
            node["additionalProperties"] = False
            node["required"] = list(node.get("properties", {}))
        for value in node.values():
            _cap_strings(value, max_chars)
    elif isinstance(node, list):
        for value in node:
            _cap_strings(value, max_chars)


def question_item_schema(max_chars: int) -> dict[str, Any]:
    """JSON schema of one generated question, from `GeneratedQuestion`, with string lengths capped."""
    raw = GeneratedQuestion.model_json_schema()
    schema = _inline_refs(raw, raw.get("$defs", {}))
    _cap_strings(schema, max_chars)
    return schema


def vscq1_generation_schema(n_questions: int, max_chars: int) -> dict[str, Any]:
    """The schema the VSCQ1 generator is constrained to: exactly `n_questions` questions.

    `max_chars` bounds every free-text field so that a bounded number of new tokens always completes the object.
    """
    if n_questions < 1:
        raise ValueError("n_questions must be >= 1")
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    return {
        "type": "object",
        "properties": {
            "questions": {
                "type": "array",
                "items": question_item_schema(max_chars),
                "minItems": n_questions,
                "maxItems": n_questions,
            }
        },
        "required": ["questions"],
        "additionalProperties": False,
    }


def max_json_chars(n_questions: int, max_chars: int) -> int:
    """An upper bound on the characters of any object valid under `vscq1_generation_schema` (compact form).

    Used to size max_new_tokens: every token emits at least one character, so this bounds the tokens too.
    """
    item = question_item_schema(max_chars)
    longest_enum = {k: max(len(v) for v in p["enum"]) for k, p in item["properties"].items() if "enum" in p}
    n_free = sum(1 for p in item["properties"].values() if p.get("type") == "string" and "enum" not in p)
    n_option = len(item["properties"]["options"]["properties"])
    # keys and punctuation: generous constant per field; each string may need escaping (x6 for \uXXXX)
    per_item = 200 + sum(longest_enum.values()) + (n_free + n_option) * (max_chars * 6 + 40)
    return 40 + n_questions * per_item
