"""Write a needle dataset in the project's own layout, so `train-selector` and `evaluate` read it unchanged.

    <out>/videos/<split>/<video_id>/frame_0000.png ...      a frames folder per video (read by qtsplus.video)
    <out>/captions/<split>-<chunk>.parquet                   Caption (the scene described in words)
    <out>/vscq1/<split>-<chunk>.parquet                      VSCQ1Question (+ target_tokens)
    <out>/vscq2/<split>_kept-<chunk>.parquet                 VSCQ2Question: the answer is known by construction,
                                                             so the "teacher" is the generator (correct = True)
    <out>/vqa/<split>-<chunk>.parquet                        VQAAnswer: the short free-form answer
    <out>/<stage>/manifest.json, README.md, run-report.json

The work is cut into chunks of videos of one split (`plan_chunks`); `build_chunk` renders and writes one chunk and is
a pure function of (config, chunk): every video and question draws from a generator seeded by (seed, split, index),
so a chunk can be rebuilt alone and gives the same bytes. Each video folder is written under a temporary name and
renamed, so a final folder always holds every frame.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel

from qtsplus.fingerprint import canonical, code_fingerprint, fingerprint
from qtsplus.needle.config import NeedleConfig
from qtsplus.needle.questions import DIFFICULTY, QUESTION_TYPE, ask, caption
from qtsplus.needle.scene import Scene, render, sample_scene
from qtsplus.shards import ChunkResult, StageManifest, chunk_files_intact, finalize_stage, write_chunk_shards
from schemas import Caption, OptionProbs, Options, Record, VQAAnswer, VSCQ1Question, VSCQ2Question

STAGES: dict[str, type[Record]] = {"captions": Caption, "vscq1": VSCQ1Question, "vscq2": VSCQ2Question,
                                   "vqa": VQAAnswer}
SPLIT_CODE = {"train": 0, "eval": 1}
VIDEOS = "videos"
FRAME = "frame_{:04d}.png"


class NeedleChunk(BaseModel):
    """Videos [first, first + count) of one split, written as chunk number `chunk`."""

    chunk: int
    split: str
    first: int
    count: int


class NeedleChunkResult(BaseModel):
    """What building one chunk produced: each stage's shards and accounting, and a digest of its frames."""

    chunk: int
    split: str
    videos: list[str]  # frames folders, relative to <out>/videos
    frames_sha256: str
    stages: dict[str, ChunkResult]


def plan_chunks(cfg: NeedleConfig) -> list[NeedleChunk]:
    """Train videos first, then eval videos, `chunk_size` per chunk (a chunk never mixes splits)."""
    chunks: list[NeedleChunk] = []
    for split, total in (("train", cfg.train_videos), ("eval", cfg.eval_videos)):
        for first in range(0, total, cfg.chunk_size):
            chunks.append(NeedleChunk(chunk=len(chunks), split=split, first=first,
                                      count=min(cfg.chunk_size, total - first)))
    return chunks


def video_id(cfg: NeedleConfig, split: str, index: int) -> str:
    return f"needle-s{cfg.seed}-{split}-{index:06d}"


def video_rng(cfg: NeedleConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLIT_CODE[split], index])


def scene_of(cfg: NeedleConfig, split: str, index: int) -> tuple[Scene, np.random.Generator]:
    """Video `index` of `split`: its scene, and its generator positioned where the questions draw next."""
    rng = video_rng(cfg, split, index)
    objects = cfg.objects
    if split == "train" and cfg.train_min_objects is not None:
        objects = int(rng.integers(cfg.train_min_objects, cfg.objects + 1))
    return sample_scene(cfg, video_id(cfg, split, index), rng, objects), rng


def train_scene(cfg: NeedleConfig, index: int) -> Scene:
    """The scene of training video `index` (what the videos/ folder holds for it)."""
    return scene_of(cfg, "train", index)[0]


def write_frames(folder: Path, frames: np.ndarray) -> str:
    """PNG frames into `folder` (replaced atomically); returns the sha256 of the raw pixels."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}.", dir=folder.parent))
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / FRAME.format(i), compress_level=1)
        tmp.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hashlib.sha256(frames.tobytes()).hexdigest()


def build_chunk(cfg: NeedleConfig, chunk: NeedleChunk, out: Path) -> NeedleChunkResult:
    """Render the chunk's videos and write its shards of every stage."""
    split = chunk.split
    rows: dict[str, list[Record]] = {stage: [] for stage in STAGES}
    digests, videos = [], []
    stats: Counter[str] = Counter()
    for index in range(chunk.first, chunk.first + chunk.count):
        vid = video_id(cfg, split, index)
        scene, rng = scene_of(cfg, split, index)
        rel = f"{split}/{vid}"
        digests.append(write_frames(out / VIDEOS / rel, render(cfg, scene)))
        videos.append(rel)
        rows["captions"].append(Caption(video_id=vid, video=rel, caption=caption(cfg, scene), partition=split,
                                        source_row=index, duration_s=cfg.frames / cfg.fps, num_frames=cfg.frames))
        for j, q in enumerate(ask(cfg, scene, rng)):
            common = dict(question_id=f"{vid}-q{j}-{q.kind}", video_id=vid, video=rel, partition=split,
                          question_type=QUESTION_TYPE[q.kind], difficulty=DIFFICULTY[q.kind], question=q.question,
                          target_tokens=q.target_tokens)
            v1 = VSCQ1Question(**common, options=Options(**q.options), answer=q.answer,
                               rationale=f"generated: {q.free_form}", evidence=q.evidence)
            rows["vscq1"].append(v1)
            probs = OptionProbs(**{k: float(k == q.answer) for k in "ABCD"})
            rows["vscq2"].append(VSCQ2Question(**v1.model_dump(), teacher_answer=q.answer, teacher_probs=probs,
                                               correct=True))
            if j < cfg.vqa_per_video:
                rows["vqa"].append(VQAAnswer(**common, answer_key=q.answer, prediction=q.free_form))
            stats.update({f"key_{q.answer}": 1, f"type_{QUESTION_TYPE[q.kind]}": 1, f"kind_{q.kind}": 1})
    split_names = {"captions": split, "vscq1": split, "vscq2": f"{split}_kept", "vqa": split}
    input_fp = fingerprint("needle", canonical(cfg.model_dump(exclude={"out"})), chunk)  # what the chunk is
    results = {}
    for stage, record in STAGES.items():
        name = split_names[stage]
        files = write_chunk_shards(out, stage, chunk.chunk, {name: (record, rows[stage])})
        stage_stats = dict(stats) if stage == "vscq1" else {"correct": len(rows["vscq2"]), "wrong": 0} \
            if stage == "vscq2" else {}
        results[stage] = ChunkResult(stage=stage, chunk=chunk.chunk, input_fingerprint=input_fp, files=files,
                                     read=chunk.count, kept=chunk.count, rejected=0,
                                     outcomes={name: len(rows[stage])} if rows[stage] else {}, stats=stage_stats)
    digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return NeedleChunkResult(chunk=chunk.chunk, split=split, videos=videos, frames_sha256=digest, stages=results)


def chunk_intact(out: Path, cfg: NeedleConfig, result: NeedleChunkResult) -> bool:
    """True when a (cached) chunk's shards are there with their sizes and every video folder holds its frames."""
    if not all(chunk_files_intact(out, r) for r in result.stages.values()):
        return False
    last = FRAME.format(cfg.frames - 1)
    return all((out / VIDEOS / v / last).is_file() for v in result.videos)


def depends_on(cfg: NeedleConfig) -> dict:
    """What every chunk depends on besides its own span: the configuration (less the output folder) and the code
    it reaches. Part of each chunk task's cache key and of every manifest's provenance."""
    return {"generator": "qtsplus.needle", "parameters": canonical(cfg.model_dump(exclude={"out"})),
            "code_version": code_fingerprint(build_chunk)}


def provenance(cfg: NeedleConfig, stage: str, out: Path) -> dict:
    """What a stage's manifest records: `depends_on`, and what train-selector / evaluate look up (the video root;
    the frame sampling the ground truth is defined for, as the VSCQ2 teacher's sampling)."""
    common = depends_on(cfg)
    if stage == "captions":
        return common | {"video_root": str((out / VIDEOS).resolve())}
    if stage == "vscq2":
        return common | {"model_id": "ground truth (by construction)", "video_sampling": canonical(cfg.sampling())}
    return common


def finalize(out: Path, cfg: NeedleConfig, results: list[NeedleChunkResult]) -> list[StageManifest]:
    """Every stage's manifest (files, rows, sha256, provenance); videos of chunks no longer planned are removed."""
    manifests = [finalize_stage(out, stage, record, [r.stages[stage] for r in results], provenance(cfg, stage, out))
                 for stage, record in STAGES.items()]
    planned = {v for r in results for v in r.videos}
    for split_dir in (out / VIDEOS).iterdir() if (out / VIDEOS).is_dir() else ():
        for folder in split_dir.iterdir():
            if f"{split_dir.name}/{folder.name}" not in planned:
                shutil.rmtree(folder)
    return manifests
