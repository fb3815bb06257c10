"""Content fingerprints and code versions: the ingredients of every cache key and manifest."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import cache
from importlib import metadata
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


# the project's own packages: the code fingerprint follows imports inside them
PROJECT_PACKAGES = ("qtsplus", "schemas")
# installed libraries whose version can change a stage's output (decoding, numerics, grammars, training)
RESULT_LIBRARIES = ("torch", "transformers", "tokenizers", "vllm", "xgrammar", "deepspeed", "peft", "av", "decord",
                    "pyarrow")


def module_closure(*roots: str) -> list[str]:
    """The project modules that importing `roots` can execute: every module named by an import statement in them or
    in a module they reach (lazy imports inside functions and `TYPE_CHECKING` blocks included, so the closure is never
    smaller than what runs), plus each module's parent packages. Read from the source files, without importing."""
    seen: set[str] = set()
    todo = [r for r in roots if _module_file(r) is not None]
    unknown = [r for r in roots if _module_file(r) is None]
    if unknown:
        raise ValueError(f"not a module of {PROJECT_PACKAGES}: {unknown}")
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += [m for m in _imports(name) if m not in seen]
    return sorted(seen)


def _module_file(name: str) -> Path | None:
    top, *rest = name.split(".")
    if top not in PROJECT_PACKAGES:
        return None
    base = _package_root(top).joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _package_root(top: str) -> Path:
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(top)
    return Path(next(iter(spec.submodule_search_locations)))


# ast.parse from two threads at once can corrupt CPython 3.11's shared AST state ("SystemError: AST constructor
# recursion depth mismatch", seen here as chunks whose results were not cached): chunk tasks compute their cache keys,
# and so this, in parallel threads.
_PARSE = threading.Lock()


_IMPORTS: dict[tuple[str, int, int], list[str]] = {}  # (module, mtime_ns, size) -> what it imports: parse each once


def _imports(name: str) -> list[str]:
    """Project modules named by the import statements of module `name`."""
    path = _module_file(name)
    assert path is not None
    stat = path.stat()
    key = (name, stat.st_mtime_ns, stat.st_size)
    with _PARSE:
        if key not in _IMPORTS:
            _IMPORTS[key] = _parse_imports(name, path)
        return _IMPORTS[key]


def _parse_imports(name: str, path: Path) -> list[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    tree = ast.parse(path.read_bytes(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    return [m for m in found if _module_file(m) is not None]


def library_versions(python: str | None = None) -> dict[str, str | None]:
    """Installed versions of `RESULT_LIBRARIES` (None: not installed), in this environment or in the one of the
    interpreter `python` (a stage worker's engine environment)."""
    # not .resolve(): a venv's bin/python is a symlink to the base interpreter, yet another environment
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        return _versions_here()
    return _versions_of(str(python))


@cache
def _versions_here() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for lib in RESULT_LIBRARIES:
        try:
            found[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            found[lib] = None
    return found


@cache
def _versions_of(python: str) -> dict[str, str | None]:
    code = ("import json, importlib.metadata as m\n"
            "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
            f"print(json.dumps({{n: v(n) for n in {list(RESULT_LIBRARIES)!r}}}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"cannot read library versions from {python}: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def code_fingerprint(*entries: Callable[..., Any] | str, python: str | None = None) -> str:
    """The version of the code behind `entries` (library functions or module names): the package version, then a hash
    of the source of every project module they reach (`module_closure`, computed, never listed by hand) and of the
    versions of the libraries that shape results (`library_versions`, in the environment of `python`).

    Editing any module an entry reaches changes it, so the cache keys that include it miss; editing a module it does
    not reach leaves it unchanged."""
    roots = [e if isinstance(e, str) else e.__module__ for e in entries]
    h = hashlib.sha256()
    for name in module_closure(*roots):
        h.update(name.encode() + b"\0")
        h.update(_module_file(name).read_bytes())  # type: ignore[union-attr]
    h.update(json.dumps(library_versions(python), sort_keys=True).encode())
    return f"{qtsplus.__version__}+{h.hexdigest()[:12]}"
