"""Parquet shards: atomic writes, per-chunk results, and the per-stage manifest.

Layout: `<out>/<stage>/<split>-<chunk:05d>.parquet`. A shard is written under a hidden temporary name in the same
folder, flushed, fsynced and renamed, so a final name always holds a complete file. Files that no chunk result
references any more (an input that shrank, a split that became empty) are removed when the stage is finalised.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from qtsplus.atomic import TMP_PREFIX, atomic_file, write_text_atomic
from qtsplus.fingerprint import file_sha256, fingerprint
from schemas import SCHEMA_VERSION, Record, to_table

R = TypeVar("R", bound=Record)

SHARD_RE = re.compile(r"^(?P<split>[a-z_]+)-(?P<chunk>\d{5})\.parquet$")


class ShardFile(BaseModel):
    """One written shard, as recorded in chunk results and manifests."""

    path: str = Field(description="relative to the dataset root")
    split: str
    rows: int
    bytes: int
    sha256: str


class ChunkResult(BaseModel):
    """What a (stage, chunk) task produced: its files and its accounting. Small; cached by Prefect."""

    stage: str
    chunk: int
    input_fingerprint: str
    files: list[ShardFile]
    read: int = Field(description="input rows this chunk read")
    kept: int = Field(description="input rows that produced output")
    rejected: int = Field(description="input rows rejected (each has a reject record)")
    outcomes: dict[str, int] = Field(default_factory=dict, description="rows written per split")
    reasons: dict[str, int] = Field(default_factory=dict, description="reject records per reason")
    stats: dict[str, int] = Field(default_factory=dict, description="stage-specific counters")
    engine: dict[str, str] = Field(default_factory=dict, description="model id and resolved revision, if one ran")
    replica: dict[str, str] = Field(default_factory=dict, description="the model replica that computed it (replica id, "
                                    "host, pid, devices); in no fingerprint, manifest or shard")

    @property
    def output_fingerprint(self) -> str:
        """Fingerprint of the chunk's outputs: what the next stage's cache key depends on."""
        return fingerprint(self.stage, self.chunk, [(f.path, f.sha256) for f in self.files])

    def files_for(self, *splits: str) -> list[ShardFile]:
        return [f for f in self.files if f.split in splits]


def shard_name(split: str, chunk: int) -> str:
    if not re.fullmatch(r"[a-z_]+", split):
        raise ValueError(f"bad split name {split!r}")
    return f"{split}-{chunk:05d}.parquet"


def write_shard(root: Path, stage: str, split: str, chunk: int, model: type[R], rows: list[R]) -> ShardFile:
    """Write one shard atomically (temporary name, fsync, rename) with zstd compression."""
    folder = root / stage
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard_name(split, chunk)
    table = to_table(model, rows)
    with atomic_file(final) as handle:
        pq.write_table(table, handle, compression="zstd")
    return ShardFile(
        path=f"{stage}/{final.name}",
        split=split,
        rows=len(rows),
        bytes=final.stat().st_size,
        sha256=file_sha256(final),
    )


def write_chunk_shards(
    root: Path, stage: str, chunk: int, outputs: dict[str, tuple[type[Record], list[Record]]]
) -> list[ShardFile]:
    """Write every non-empty split of a chunk, then remove this chunk's files of splits that are now empty."""
    files = [write_shard(root, stage, split, chunk, model, rows) for split, (model, rows) in outputs.items() if rows]
    keep = {Path(f.path).name for f in files}
    folder = root / stage
    for path in folder.glob(f"*-{chunk:05d}.parquet"):
        if path.name not in keep:
            path.unlink()
    return files


def read_rows(root: Path, files: Iterable[ShardFile], model: type[R]) -> Iterator[R]:
    """Stream records of one kind from shards, batch by batch."""
    for shard in files:
        parquet = pq.ParquetFile(root / shard.path)
        if parquet.schema_arrow.metadata.get(b"qtsplus.schema_version") != SCHEMA_VERSION.encode():
            raise ValueError(f"{shard.path}: schema version differs from {SCHEMA_VERSION}")
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield model.model_validate(row)


def chunk_files_intact(root: Path, result: ChunkResult) -> bool:
    """True when every file a (cached) chunk result names exists with its recorded size."""
    for shard in result.files:
        path = root / shard.path
        if not path.is_file() or path.stat().st_size != shard.bytes:
            return False
    return True


def remove_unreferenced(root: Path, stage: str, results: Iterable[ChunkResult]) -> list[str]:
    """Delete shards and stale temporaries of a stage that no chunk result references. Returns what was removed."""
    folder = root / stage
    if not folder.is_dir():
        return []
    referenced = {Path(f.path).name for r in results for f in r.files}
    removed = []
    for path in sorted(folder.iterdir()):
        stale_tmp = path.name.startswith(TMP_PREFIX)
        stale_shard = SHARD_RE.match(path.name) is not None and path.name not in referenced
        if stale_tmp or stale_shard:
            path.unlink()
            removed.append(path.name)
    return removed


class StageManifest(BaseModel):
    """The per-stage manifest: every file with rows and sha256, plus the provenance of the stage."""

    stage: str
    schema_version: str = SCHEMA_VERSION
    record: str
    files: list[ShardFile]
    rows_per_split: dict[str, int]
    read: int
    kept: int
    rejected: int
    reasons: dict[str, int]
    stats: dict[str, int]
    provenance: dict = Field(description="model ids and revisions, prompt version, sampling parameters, code version")

    @classmethod
    def from_results(
        cls, stage: str, record: type[Record], results: list[ChunkResult], provenance: dict
    ) -> StageManifest:
        rows: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        stats: Counter[str] = Counter()
        for r in results:
            rows.update(r.outcomes)
            reasons.update(r.reasons)
            stats.update(r.stats)
        return cls(
            stage=stage,
            record=record.__name__,
            files=[f for r in sorted(results, key=lambda r: r.chunk) for f in r.files],
            rows_per_split=dict(sorted(rows.items())),
            read=sum(r.read for r in results),
            kept=sum(r.kept for r in results),
            rejected=sum(r.rejected for r in results),
            reasons=dict(sorted(reasons.items())),
            stats=dict(sorted(stats.items())),
            provenance=provenance,
        )

    def write(self, root: Path) -> Path:
        """Write `<root>/<stage>/manifest.json` atomically."""
        return write_text_atomic(root / self.stage / "manifest.json", self.model_dump_json(indent=2) + "\n")


TRAINING_STAGES = ("captions", "vscq2", "vqa")  # what train-selector and evaluate read


def load_manifest(root: Path, stage: str) -> StageManifest:
    return StageManifest.model_validate(json.loads(manifest_path(root, stage).read_text()))


def manifest_path(root: Path, stage: str) -> Path:
    """`<root>/<stage>/manifest.json`, or a FileNotFoundError that says what is missing and how to get it."""
    path = Path(root) / stage / "manifest.json"
    if not path.is_file():
        what = "no such folder" if not Path(root).is_dir() else f"no {stage}/manifest.json"
        raise FileNotFoundError(f"{root}: {what}; not a dataset finished by `qtsplus build-dataset --out {root}` "
                                f"(its stage {stage!r} is missing)")
    return path


def manifest_digests(root: Path, stages: Iterable[str] = TRAINING_STAGES) -> dict[str, str]:
    """sha256 of each stage's manifest (which lists its files' sha256): the identity of a dataset's content."""
    return {stage: file_sha256(manifest_path(root, stage)) for stage in stages}


def finalize_stage(
    root: Path, stage: str, record: type[Record], results: list[ChunkResult], provenance: dict
) -> StageManifest:
    """Write a stage's manifest and remove the files no chunk references; check the accounting."""
    for r in results:
        if r.kept + r.rejected != r.read:
            raise RuntimeError(f"{stage} chunk {r.chunk}: kept {r.kept} + rejected {r.rejected} != read {r.read}")
    engines = sorted({(r.engine["model_id"], r.engine["revision"]) for r in results if r.engine})
    provenance = provenance | {"resolved_models": [f"{m}@{rev}" for m, rev in engines]}
    manifest = StageManifest.from_results(stage, record, results, provenance)
    remove_unreferenced(root, stage, results)
    manifest.write(root)
    return manifest
