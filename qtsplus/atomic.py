"""Atomic file writes: a reader never sees a partial file under its final name, and a crash leaves only a temporary
file (named `.tmp-*`, which the stage finalisers sweep)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator[IO]:
    """A temporary file next to `final`, opened in `mode`; when the block ends normally it is fsynced and renamed to
    `final`, when it raises the temporary file is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a small text file atomically."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return path
