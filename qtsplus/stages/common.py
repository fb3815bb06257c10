"""Pieces shared by the stages: stable seeds, reject records, video groups."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtsplus.fingerprint import canonical
from qtsplus.video import (
    PathOutsideRoot,
    SamplingConfig,
    VideoClip,
    VideoError,
    load_video,
    resolve_video_path,
)
from schemas import RAW_MAX_CHARS, Reject, VSCQ1Question


def stable_seed(*parts: object) -> int:
    """A 31-bit seed derived from `parts`, identical across processes and Python versions."""
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def engine_info(engine: object | None) -> dict[str, str]:
    """Model id and resolved revision of the engine a chunk used ({} when none ran)."""
    if engine is None:
        return {}
    return {"model_id": str(engine.model_id), "revision": str(engine.revision)}  # type: ignore[attr-defined]


def engine_settings(cfg: object) -> dict[str, Any]:
    """An engine config as a stage's dependency: every setting but the interpreter path it runs under (what that
    environment contributes, its library versions, is in the stage's code fingerprint)."""
    return {k: v for k, v in canonical(cfg).items() if k != "python"}


def ready_groups(questions: Sequence[VSCQ1Question], video_root: Path, sampling: SamplingConfig, group_size: int,
                 stage: str, chunk: int, rejects: list[Reject]) -> Iterator[list[tuple[VSCQ1Question, VideoClip]]]:
    """The questions with their decoded clips, a group at a time; a question whose video does not decode becomes a
    `video_decode_error` reject (appended to `rejects`)."""
    for group in iter_video_groups(questions, video_root, sampling, group_size):
        for q, why in group.failed:
            rejects.append(make_reject(stage, chunk, "video_decode_error", why, q.model_dump_json(),
                                       record_id=q.question_id))
        if group.ready:
            yield group.ready


def make_reject(
    stage: str, chunk: int, reason: str, detail: str, raw: str, *, level: str = "row",
    source_row: int | None = None, record_id: str | None = None,
) -> Reject:
    return Reject(
        stage=stage, chunk=chunk, level=level, source_row=source_row, record_id=record_id,  # type: ignore[arg-type]
        reason=reason, detail=detail[:500], raw=raw[:RAW_MAX_CHARS],
    )


@dataclass
class VideoGroup:
    """Questions whose videos decoded, with one clip per question; and those whose video failed, with why."""

    ready: list[tuple[VSCQ1Question, VideoClip]]
    failed: list[tuple[VSCQ1Question, str]]


def iter_video_groups(
    questions: Sequence[VSCQ1Question], video_root: Path, sampling: SamplingConfig, group_size: int
) -> Iterator[VideoGroup]:
    """Decode each video once and hand out groups of about `group_size` questions (whole videos per group).

    Only one group's clips are in memory at a time.
    """
    by_video: dict[str, list[VSCQ1Question]] = {}
    for q in questions:
        by_video.setdefault(q.video, []).append(q)
    group = VideoGroup([], [])
    for video, qs in by_video.items():
        try:
            clip = load_video(resolve_video_path(video_root, video), sampling)
        except (VideoError, PathOutsideRoot, FileNotFoundError) as err:
            group.failed.extend((q, f"{type(err).__name__}: {err}") for q in qs)
        else:
            group.ready.extend((q, clip) for q in qs)
        if len(group.ready) + len(group.failed) >= group_size:
            yield group
            group = VideoGroup([], [])
    if group.ready or group.failed:
        yield group
