"""Content fingerprints and code versions: the ingredients of every cache key and manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import qtsplus


def canonical(obj: Any) -> Any:
    """A JSON-able, order-independent view of configs and records (dataclasses, pydantic models, paths)."""
    if isinstance(obj, BaseModel):
        return canonical(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return canonical(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot fingerprint {type(obj).__name__}")


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts`."""
    text = json.dumps([canonical(p) for p in parts], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@cache
def code_version(*modules: str) -> str:
    """The package version plus a hash of the source of the modules a stage depends on.

    Editing any of them changes the version, and with it the cache keys of the stages that name them.
    """
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode())
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return f"{qtsplus.__version__}+{h.hexdigest()[:12]}"
