"""How many tokens a schema-constrained JSON output can take at most.

xgrammar (``any_whitespace=False``, strict mode) emits a fixed layout: separators ``", "`` and ``": "``, properties in
schema order, no additional properties, length-bounded strings without escapes (so at most 4 UTF-8 bytes per
character). Every token of a byte-level vocabulary is at least one byte, so a bound on the UTF-8 bytes of any value the
grammar admits is a bound on its tokens. With that bound as the token budget, a bounded schema always completes.
"""

from __future__ import annotations

import json
from typing import Any

_MAX_UTF8_BYTES_PER_CHAR = 4


def max_json_bytes(schema: Any, root: Any = None, _refs: tuple[str, ...] = ()) -> int | None:
    """Upper bound on the UTF-8 length of any value xgrammar accepts for ``schema``; None when unbounded or unknown
    (strings without maxLength, numbers, arrays without maxItems, open objects, patterns, recursion...)."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or not schema:
        return None
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/") or ref in _refs:
            return None
        target = root
        for part in ref[2:].split("/"):
            target = (
                target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
            )
        return max_json_bytes(target, root, (*_refs, ref))
    if "const" in schema:
        return _literal_bytes(schema["const"])
    if "enum" in schema:
        return max((_literal_bytes(v) for v in schema["enum"]), default=None)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return _max_or_none(max_json_bytes(s, root, _refs) for s in schema[key])
    if "allOf" in schema:
        return None
    kind = schema.get("type")
    if isinstance(kind, list):
        return _max_or_none(max_json_bytes({**schema, "type": k}, root, _refs) for k in kind)
    if kind == "null":
        return 4
    if kind == "boolean":
        return 5
    if kind == "integer":
        return _integer_bytes(schema)
    if kind == "string":
        if "pattern" in schema or "format" in schema or "maxLength" not in schema:
            return None
        return 2 + _MAX_UTF8_BYTES_PER_CHAR * int(schema["maxLength"])
    if kind == "array":
        return _array_bytes(schema, root, _refs)
    if kind == "object":
        return _object_bytes(schema, root, _refs)
    return None


def max_json_tokens(schema: dict) -> int | None:
    """Token budget that lets every output of ``schema`` finish, including the end-of-turn token; None if unbounded."""
    n = max_json_bytes(schema)
    return None if n is None else n + 1


def _literal_bytes(value: Any) -> int:
    return max(len(json.dumps(value, ensure_ascii=a).encode()) for a in (False, True))


def _max_or_none(bounds) -> int | None:
    bounds = list(bounds)
    if not bounds or any(b is None for b in bounds):
        return None
    return max(bounds)


def _integer_bytes(schema: dict) -> int | None:
    lo = schema.get("minimum", None if "exclusiveMinimum" not in schema else schema["exclusiveMinimum"] + 1)
    hi = schema.get("maximum", None if "exclusiveMaximum" not in schema else schema["exclusiveMaximum"] - 1)
    if lo is None or hi is None:
        return None
    return max(len(str(int(lo))), len(str(int(hi))))


def _array_bytes(schema: dict, root: Any, refs: tuple[str, ...]) -> int | None:
    prefix = schema.get("prefixItems", [])
    items = schema.get("items")
    n = schema.get("maxItems")
    if n is None:
        if items is not False:
            return None
        n = len(prefix)
    if items is False:
        n = min(n, len(prefix))
    bounds = [max_json_bytes(prefix[i] if i < len(prefix) else items, root, refs) for i in range(n)]
    if any(b is None for b in bounds):
        return None
    return 2 + sum(bounds) + 2 * max(n - 1, 0)


def _object_bytes(schema: dict, root: Any, refs: tuple[str, ...]) -> int | None:
    if schema.get("additionalProperties", False) is not False or "patternProperties" in schema:
        return None
    props = schema.get("properties", {})
    total = 2 + 2 * max(len(props) - 1, 0)
    for key, sub in props.items():
        bound = max_json_bytes(sub, root, refs)
        if bound is None:
            return None
        total += _literal_bytes(key) + 2 + bound
    return total
