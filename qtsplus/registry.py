"""A model registry folder: every trained version with its metrics and lineage, and an atomic `current` pointer.

    <registry>/
      versions/v0001/checkpoint/      a QTSplus checkpoint (from_pretrained)
      versions/v0001/metrics.json     the evaluation it was judged on
      versions/v0001/lineage.json     dataset manifests, configs, parent version, input files, decision
      current -> versions/v0002       symlink, replaced atomically (rename) on promotion
      .lock                           held for the whole of a retrain run: runs on one registry never overlap
      lock-history.jsonl              when each run held the lock (pid, acquired, released)

Versions are never deleted or rewritten; promotion only moves the pointer.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qtsplus.atomic import write_text_atomic


class Registry:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.versions.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lock(self, blocking: bool = True) -> Iterator[None]:
        """Exclusive lock on the registry (a second holder waits, or gets BlockingIOError if not blocking)."""
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            acquired = time.time()
            try:
                yield
            finally:
                self._log({"pid": os.getpid(), "acquired": acquired, "released": time.time()})
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _log(self, entry: dict) -> None:
        """Append to `<registry>/lock-history.jsonl` (one short write while the lock is held)."""
        with open(self.root / "lock-history.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def lock_history(self) -> list[dict]:
        path = self.root / "lock-history.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def list(self) -> list[str]:
        return sorted(p.name for p in self.versions.iterdir() if p.is_dir() and (p / "lineage.json").is_file())

    def next_version(self) -> str:
        taken = [int(v[1:]) for v in self.list()] + [
            int(p.name[1:].split(".")[0]) for p in self.versions.iterdir() if p.name[1:].split(".")[0].isdigit()
        ]
        return f"v{max(taken, default=0) + 1:04d}"

    def current(self) -> str | None:
        link = self.root / "current"
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def checkpoint(self, version: str) -> Path:
        return self.versions / version / "checkpoint"

    def metrics(self, version: str) -> dict:
        return json.loads((self.versions / version / "metrics.json").read_text())

    def lineage(self, version: str) -> dict:
        return json.loads((self.versions / version / "lineage.json").read_text())

    def add(self, version: str, checkpoint: Path, metrics: dict, lineage: dict) -> Path:
        """Copy a checkpoint in as `version` with its metrics and lineage (staged, then renamed into place)."""
        final = self.versions / version
        if final.exists():
            raise FileExistsError(f"{final} exists: versions are immutable")
        staging = self.versions / f"{version}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint, staging / "checkpoint")
        write_text_atomic(staging / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        write_text_atomic(staging / "lineage.json", json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        staging.rename(final)
        return final

    def promote(self, version: str) -> None:
        """Point `current` at `version` atomically (a new symlink renamed over the old one)."""
        if version not in self.list():
            raise KeyError(f"no version {version} in {self.root}")
        tmp = self.root / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(Path("versions") / version, tmp)
        os.replace(tmp, self.root / "current")
