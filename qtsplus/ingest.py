"""Ingest: caption files to validated `Caption` records, chunk by chunk, with every bad row quarantined.

Two passes, both streamed:
1. `scan_input` reads the file once and cuts it into chunks of `chunk_size` input rows (good or bad), recording each
   chunk's byte range and a hash of its raw bytes, and which rows repeat an id seen earlier (and where it was first
   seen). Appending rows to the file leaves every complete earlier chunk, and so its hash and its cache key,
   unchanged.
2. `ingest_chunk` parses and validates the rows of one chunk and writes its `captions` shards and rejects.

Accepted formats: ShareGPTVideo caption JSONL (`id`, `video`, `conversations` with the caption as the first `gpt`
turn) and plain `{video_id, video, caption}` rows as JSONL or Parquet. JSONL may use CRLF line ends and may carry a
UTF-8 byte-order mark at the start of any line (a file saved with a BOM, or several such files concatenated).

Duplicates: the first row that parses as a caption claims its id; every later row with the same id is rejected as
`duplicate_id`, its detail naming where the id was first seen. A JSONL caption file built by concatenating other
files may have a sidecar `<file>.sources.json` (a list of `{name, start, end}` byte ranges, as `qtsplus.inbox`
writes it); then every reject's detail also names the file and row its row came from.

Memory: the scan keeps one 16-byte digest and the first row per distinct id (to find duplicates); everything else is
streamed.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from qtsplus.fingerprint import canonical, code_fingerprint
from qtsplus.shards import ChunkResult, write_chunk_shards
from qtsplus.video import PathOutsideRoot, VideoError, probe_video, resolve_video_path
from schemas import RAW_MAX_CHARS, Caption, Reject

STAGE = "captions"


class IngestConfig(BaseModel):
    """How captions are read, validated and split."""

    chunk_size: int = Field(1000, ge=1, description="input rows per chunk (one task per chunk and stage)")
    eval_fraction: float = Field(0.05, ge=0.0, le=1.0, description="share of videos in the eval partition")
    split_salt: str = Field("qtsplus-split-v1", description="salt of the train/eval hash split by video")
    max_caption_chars: int = Field(8000, ge=1)
    probe_videos: bool = Field(True, description="open each video at ingest to reject unreadable ones early")
    video_check: Literal["open", "scan", "decode"] = Field(
        "scan",
        description="how hard the probe looks (qtsplus.video.probe_video's `check`): 'open' the container or the "
        "first image; 'scan' also reads every packet of a file and decodes every image of a frames folder at 1/8 "
        "size; 'decode' also decodes every frame of a file (about one full decode per video)",
    )
    frames_folder_fps: float = Field(1.0, gt=0, description="native fps assumed for folders of frames")


def depends_on(cfg: IngestConfig, video_root: str) -> dict[str, Any]:
    """What a captions chunk depends on besides its input rows (their bytes): the cache key and the manifest's
    provenance."""
    return {"video_root": video_root, "ingest": canonical(cfg), "code_version": code_fingerprint(ingest_chunk)}


class RowError(ValueError):
    """A row that cannot become a record: `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceRange:
    """Bytes [start, end) of a caption file that came from the file `name` (an inbox drop, say)."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class RowSource:
    """Rows from `first_row` on come from the source range `name` that starts at byte `start`; `name` "" marks rows
    that no range covers (bytes appended to the file outside the sidecar's knowledge)."""

    name: str
    start: int
    first_row: int


@dataclass(frozen=True)
class ChunkSpec:
    """A chunk of the input: rows [start_row, start_row + num_rows), its bytes and their hash.

    `duplicates` holds (row, where its id was first seen) for the rows that repeat an id; `sources` the source files
    that the chunk's rows came from (empty unless the input has a sources sidecar)."""

    chunk: int
    start_row: int
    num_rows: int
    byte_offset: int
    byte_length: int
    raw_sha256: str
    duplicates: tuple[tuple[int, str], ...] = ()
    sources: tuple[RowSource, ...] = ()

    @property
    def duplicate_rows(self) -> tuple[int, ...]:
        return tuple(row for row, _ in self.duplicates)


@dataclass
class RawRow:
    source_row: int
    raw: str
    data: dict | None = None
    error: RowError | None = None


def sources_path(path: Path) -> Path:
    """The sidecar that says which byte ranges of a concatenated caption file came from which file."""
    return path.with_name(path.name + ".sources.json")


def read_sources(path: Path) -> list[SourceRange]:
    """The byte ranges of `path`'s sources sidecar, in file order ([] without a sidecar); ValueError if malformed."""
    sidecar = sources_path(path)
    if not sidecar.is_file():
        return []
    try:
        ranges = [SourceRange(str(e["name"]), int(e["start"]), int(e["end"])) for e in json.loads(sidecar.read_text())]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{sidecar}: not a JSON list of {{name, start, end}} byte ranges: {err}") from err
    end = 0
    for r in ranges:
        if not end <= r.start <= r.end:
            raise ValueError(f"{sidecar}: byte ranges must be in file order and not overlap: {r}")
        end = r.end
    return ranges


def source_label(sources: Sequence[RowSource], row: int, first_rows: Sequence[int] | None = None) -> str | None:
    """'row k of NAME' for an input row that came from one of `sources` (sorted by first_row; `first_rows` are
    their first rows, if already listed), else None."""
    i = bisect.bisect_right([s.first_row for s in sources] if first_rows is None else first_rows, row) - 1
    if i < 0 or not sources[i].name:
        return None
    return f"row {row - sources[i].first_row} of {sources[i].name}"


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"{path}: unsupported caption file type {suffix!r} (use .jsonl or .parquet)")


def _decode_json_line(line: bytes, source_row: int) -> RawRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRow(source_row, line.decode("utf-8", "replace"), error=RowError("invalid_utf8", str(err)))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return RawRow(source_row, text, error=RowError("malformed_json", str(err)))
    if not isinstance(data, dict):
        return RawRow(source_row, text, error=RowError("not_an_object", f"a JSON {type(data).__name__}"))
    return RawRow(source_row, text, data=data)


def _row_id(data: dict) -> str | None:
    value = data.get("id", data.get("video_id"))
    return str(value) if value is not None else None


def _caption_id(data: dict) -> str | None:
    """The id a row claims (the `video_id` its Caption would get), or None if the row is not a usable caption."""
    try:
        return parse_caption(data)[0]
    except RowError:
        return None


def _row_bytes(line: bytes) -> bytes:
    """A JSONL line without its line end and without a leading UTF-8 byte-order mark."""
    line = line.rstrip(b"\r\n")
    return line[len(codecs.BOM_UTF8):] if line.startswith(codecs.BOM_UTF8) else line


def count_jsonl_rows(data: bytes) -> int:
    """How many rows ingest reads from these JSONL bytes (non-blank lines)."""
    return sum(1 for line in data.split(b"\n") if _row_bytes(line).strip())


def _iter_jsonl_lines(path: Path, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(start offset, end offset, line without newline and BOM) for each non-blank line in a byte range."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        end = None if length is None else offset + length
        for line in f:
            if end is not None and pos >= end:
                break
            start = pos
            pos += len(line)
            stripped = _row_bytes(line)
            if stripped.strip():
                yield start, pos, stripped


def _parquet_rows(path: Path, start: int = 0, count: int | None = None) -> Iterator[dict]:
    """Rows [start, start+count) of a Parquet file, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(path)
    first = 0
    end = None if count is None else start + count
    for g in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if first + n <= start:
            first += n
            continue
        if end is not None and first >= end:
            break
        for i, row in enumerate(parquet.read_row_group(g).to_pylist()):
            idx = first + i
            if idx >= start and (end is None or idx < end):
                yield row
        first += n


def scan_input(path: Path, chunk_size: int) -> list[ChunkSpec]:
    """Cut the input into chunks of `chunk_size` rows; hash each chunk's raw rows; find repeated ids (and, with a
    sources sidecar, which source file each chunk's rows came from)."""
    fmt = input_format(path)
    ranges = read_sources(path) if fmt == "jsonl" else []
    first_seen: dict[bytes, int] = {}  # id digest -> first row that claimed it
    sources: list[RowSource] = []  # the ranges that hold rows (and the gaps between them), with their first row
    first_rows: list[int] = []
    cursor = 0  # the range the scan is in (rows come in file order)
    specs: list[ChunkSpec] = []
    state: dict = {}

    def where(row: int) -> str:
        label = source_label(sources, row, first_rows)
        return f"row {row} ({label})" if label else f"row {row}"

    def source_at(offset: int, row: int) -> None:
        nonlocal cursor
        while cursor < len(ranges) and ranges[cursor].end <= offset:
            cursor += 1
        inside = cursor < len(ranges) and ranges[cursor].start <= offset
        name, start = (ranges[cursor].name, ranges[cursor].start) if inside else ("", -1)
        if not sources or (sources[-1].name, sources[-1].start) != (name, start):
            sources.append(RowSource(name, start, row))
            first_rows.append(row)
        if not state["sources"] or state["sources"][-1] != sources[-1]:
            state["sources"].append(sources[-1])

    def close() -> None:
        if state.get("rows"):
            specs.append(
                ChunkSpec(
                    chunk=len(specs),
                    start_row=state["start_row"],
                    num_rows=state["rows"],
                    byte_offset=state["offset"],
                    byte_length=state["end"] - state["offset"],
                    raw_sha256=state["hash"].hexdigest(),
                    duplicates=tuple(state["dups"]),
                    sources=tuple(state["sources"]),
                )
            )
        state.clear()

    def add(row: int, offset: int, end: int, raw: bytes, data: dict | None) -> None:
        if not state:
            state.update(start_row=row, rows=0, offset=offset, hash=hashlib.sha256(), dups=[], sources=[])
        state["rows"] += 1
        state["end"] = end
        state["hash"].update(len(raw).to_bytes(8, "little") + raw)
        if ranges:
            source_at(offset, row)
        caption_id = _caption_id(data) if data is not None else None
        if caption_id is not None:
            digest = hashlib.blake2b(caption_id.encode(), digest_size=16).digest()
            first = first_seen.setdefault(digest, row)
            if first != row:
                state["dups"].append((row, where(first)))
        if state["rows"] == chunk_size:
            close()

    row = 0
    if fmt == "jsonl":
        for offset, end, line in _iter_jsonl_lines(path):
            parsed = _decode_json_line(line, row)
            add(row, offset, end, line, parsed.data)
            row += 1
    else:
        for data in _parquet_rows(path):
            raw = json.dumps(data, sort_keys=True, default=str).encode()
            add(row, 0, 0, raw, data)
            row += 1
    close()
    return specs


def read_chunk_rows(path: Path, spec: ChunkSpec) -> Iterator[RawRow]:
    """The rows of one chunk, decoded (bad rows carry their error)."""
    if input_format(path) == "jsonl":
        for i, (_, _, line) in enumerate(_iter_jsonl_lines(path, spec.byte_offset, spec.byte_length)):
            yield _decode_json_line(line, spec.start_row + i)
    else:
        for i, data in enumerate(_parquet_rows(path, spec.start_row, spec.num_rows)):
            yield RawRow(spec.start_row + i, json.dumps(data, default=str), data=data)


# --- validation -------------------------------------------------------------------------------------------------

_INJECTION_PATTERNS = [
    (re.compile(r"<\|[a-z_]+\|>"), "chat special token in text"),
    (
        re.compile(
            r"\b(ignore|disregard|forget|override)\b[^.\n]{0,60}\b(instructions?|prompts?|rules|directions)\b", re.I
        ),
        "asks the model to ignore its instructions",
    ),
    (re.compile(r"\bsystem prompt\b|\bnew instructions?\s*:", re.I), "addresses the model's prompt"),
    (re.compile(r"\byou are (now )?(an? )?(ai|assistant|language model|chatbot)\b", re.I), "re-assigns the model's role"),
]


def injection_reason(text: str) -> str | None:
    """Why a caption looks like an attempt to instruct the model, or None. Heuristic and conservative."""
    for pattern, why in _INJECTION_PATTERNS:
        if pattern.search(text):
            return why
    return None


def parse_caption(data: dict) -> tuple[str, str, str]:
    """(video_id, video path, caption) from a ShareGPTVideo or plain row; RowError if it has none."""
    if "conversations" in data:
        video_id, video = data.get("id"), data.get("video")
        turns = data.get("conversations")
        if not isinstance(turns, list):
            raise RowError("bad_conversations", "conversations is not a list")
        answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        caption = answers[0] if answers else None
    else:
        video_id, video, caption = data.get("video_id"), data.get("video"), data.get("caption")
    if video_id is None or str(video_id).strip() == "":
        raise RowError("missing_id", "no id / video_id")
    if not isinstance(video, str) or not video.strip():
        raise RowError("missing_video", "no video path")
    if caption is None:
        raise RowError("missing_caption", "no caption")
    if not isinstance(caption, str):
        raise RowError("missing_caption", f"caption is a {type(caption).__name__}")
    if not caption.strip():
        raise RowError("empty_caption", "caption is blank")
    return str(video_id).strip(), video.strip(), caption.strip()


def partition_of(video: str, eval_fraction: float, salt: str) -> str:
    """Deterministic train/eval split keyed by the video path, so no video is in both partitions."""
    h = int.from_bytes(hashlib.sha256(f"{salt}\x00{video}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


@lru_cache(maxsize=4096)
def _probe_cached(path: str, size: int, mtime_ns: int, frames_folder_fps: float, check: str) -> tuple[float, int]:
    meta = probe_video(Path(path), frames_folder_fps=frames_folder_fps, check=check)  # type: ignore[arg-type]
    return meta.duration, meta.num_frames


def validate_row(
    row: RawRow, spec: ChunkSpec, cfg: IngestConfig, video_root: Path, duplicates: dict[int, str] | None = None
) -> Caption:
    """A checked Caption, or RowError naming why not. `duplicates` is `dict(spec.duplicates)`, if already built."""
    if row.error is not None:
        raise row.error
    assert row.data is not None
    video_id, video, caption = parse_caption(row.data)
    first = (dict(spec.duplicates) if duplicates is None else duplicates).get(row.source_row)
    if first is not None:
        raise RowError("duplicate_id", f"id {video_id!r} already seen in {first}")
    if len(caption) > cfg.max_caption_chars:
        raise RowError("caption_too_long", f"{len(caption)} chars > {cfg.max_caption_chars}")
    if why := injection_reason(caption):
        raise RowError("suspected_prompt_injection", why)
    try:
        path = resolve_video_path(video_root, video)
    except PathOutsideRoot as err:
        raise RowError("path_outside_root", str(err)) from err
    if not path.exists():
        raise RowError("video_not_found", f"{video} (under {video_root})")
    duration = num_frames = None
    if cfg.probe_videos:
        st = path.stat()
        try:
            duration, num_frames = _probe_cached(
                str(path), st.st_size, st.st_mtime_ns, cfg.frames_folder_fps, cfg.video_check
            )
        except VideoError as err:
            raise RowError("video_unreadable", str(err)) from err
    return Caption(
        video_id=video_id,
        video=video,
        caption=caption,
        partition=partition_of(video, cfg.eval_fraction, cfg.split_salt),  # type: ignore[arg-type]
        source_row=row.source_row,
        duration_s=duration,
        num_frames=num_frames,
    )


@dataclass
class ChunkCaptions:
    captions: list[Caption] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def validate_chunk(path: Path, spec: ChunkSpec, cfg: IngestConfig, video_root: Path) -> ChunkCaptions:
    """Every row of a chunk becomes either a Caption or a Reject (whose detail names the row's source file, if the
    input has a sources sidecar)."""
    out = ChunkCaptions()
    duplicates = dict(spec.duplicates)
    for row in read_chunk_rows(path, spec):
        try:
            out.captions.append(validate_row(row, spec, cfg, video_root, duplicates))
        except RowError as err:
            record_id = _row_id(row.data) if row.data is not None else None
            label = source_label(spec.sources, row.source_row)
            detail = f"{label}: {err.detail}" if label else err.detail
            out.rejects.append(
                Reject(
                    stage=STAGE,
                    chunk=spec.chunk,
                    level="row",
                    source_row=row.source_row,
                    record_id=record_id,
                    reason=err.reason,
                    detail=detail[:500],
                    raw=row.raw[:RAW_MAX_CHARS],
                )
            )
    return out


def ingest_chunk(path: Path, spec: ChunkSpec, cfg: IngestConfig, video_root: Path, out: Path) -> ChunkResult:
    """Validate one chunk and write its `captions` shards (train, eval) and rejects."""
    result = validate_chunk(path, spec, cfg, video_root)
    by_part = {p: [c for c in result.captions if c.partition == p] for p in ("train", "eval")}
    files = write_chunk_shards(
        out,
        STAGE,
        spec.chunk,
        {"train": (Caption, by_part["train"]), "eval": (Caption, by_part["eval"]), "rejects": (Reject, result.rejects)},
    )
    read = len(result.captions) + len(result.rejects)
    if read != spec.num_rows:
        raise RuntimeError(f"chunk {spec.chunk}: read {read} rows, the scan saw {spec.num_rows}")
    return ChunkResult(
        stage=STAGE,
        chunk=spec.chunk,
        input_fingerprint=spec.raw_sha256,
        files=files,
        read=read,
        kept=len(result.captions),
        rejected=len(result.rejects),
        outcomes={k: len(v) for k, v in by_part.items() if v} | ({"rejects": len(result.rejects)} if result.rejects else {}),
        reasons=dict(Counter(r.reason for r in result.rejects)),
    )
