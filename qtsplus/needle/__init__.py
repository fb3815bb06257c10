"""The needle-in-a-video-haystack task: procedurally made videos and questions whose answers, and the visual tokens
that hold them, are known by construction (docs/needle.md).

    from qtsplus.needle import NeedleConfig, build_needle
    build_needle(NeedleConfig.preset("needle", out="runs/needle-data"))   # the library path, without Prefect

`qtsplus build-needle` (flows/needle.py) runs the same chunks as cached, resumable Prefect tasks.
"""

from __future__ import annotations

from pathlib import Path

from qtsplus.atomic import write_text_atomic
from qtsplus.needle.card import render_needle_card
from qtsplus.needle.config import NEEDLE_PRESETS, NeedleConfig
from qtsplus.needle.writer import (
    NeedleChunk,
    NeedleChunkResult,
    build_chunk,
    chunk_intact,
    depends_on,
    finalize,
    plan_chunks,
)
from qtsplus.shards import StageManifest

__all__ = [
    "NEEDLE_PRESETS",
    "NeedleChunk",
    "NeedleChunkResult",
    "NeedleConfig",
    "build_chunk",
    "build_needle",
    "chunk_intact",
    "depends_on",
    "finalize",
    "plan_chunks",
    "write_card",
]


def write_card(out: Path, cfg: NeedleConfig, manifests: list[StageManifest]) -> Path:
    return write_text_atomic(out / "README.md", render_needle_card(out, cfg, manifests))


def build_needle(cfg: NeedleConfig) -> list[StageManifest]:
    """Every chunk, the manifests and the card, in this process (no cache: the flow adds one)."""
    out = Path(cfg.out)
    results = [build_chunk(cfg, chunk, out) for chunk in plan_chunks(cfg)]
    manifests = finalize(out, cfg, results)
    write_card(out, cfg, manifests)
    return manifests
