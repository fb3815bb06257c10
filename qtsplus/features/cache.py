"""Writing a feature store: run the frozen vision tower (with its patch merger) once per video and keep the result.

`plan_features` lists the dataset's videos per chunk (the chunks of build-dataset, first occurrence wins), hashes
them and estimates the storage; `run_feature_chunk` (one Prefect task per chunk, in the stage's worker process)
decodes each video exactly as training does (`load_video` + `qwen_video_inputs` with the run's `SamplingConfig`), runs
the vision tower loaded once per process, and writes one Parquet shard atomically; `finalize_features` writes the
set's manifest (every shard with its sha256, every video's entry) and removes shards no chunk references.
The reader side (hashes, format, verified lookups) is `qtsplus.features.store`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from qtsplus.atomic import TMP_PREFIX, atomic_file, write_text_atomic
from qtsplus.checkpoints import model_code
from qtsplus.features.config import FEATURES_DIR, FeatureConfig
from qtsplus.features.store import (
    FEATURES_VERSION,
    MANIFEST,
    SHARD_PREFIX,
    TORCH_DTYPES,
    FeatureEntry,
    FeatureManifest,
    FeatureSpec,
    encode_features,
    features_digest,
    resolved_revision,
    video_sha256,
    vision_fingerprint,
)
from qtsplus.fingerprint import canonical, code_fingerprint, file_sha256, fingerprint
from qtsplus.shards import ShardFile, load_manifest
from qtsplus.video import (
    QwenVideoInputs,
    SamplingConfig,
    VideoError,
    load_video,
    probe_video,
    qwen_video_inputs,
    resolve_video_path,
    sample_frame_indices,
    smart_resize,
)

SHARD_SCHEMA = pa.schema([
    ("video_sha256", pa.string()),
    ("grid_thw", pa.list_(pa.int64(), 3)),
    ("second_per_grid_t", pa.float64()),
    ("timestamps", pa.list_(pa.float64())),
    ("num_tokens", pa.int64()),
    ("dim", pa.int64()),
    ("dtype", pa.string()),
    ("features", pa.large_binary()),
    ("scales", pa.large_binary()),
    ("features_sha256", pa.string()),
], metadata={b"qtsplus.features_version": FEATURES_VERSION.encode()})


# -------------------------------------------------------------------------------------------------- config


def store_root(cfg: FeatureConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.data) / FEATURES_DIR


def dataset_video_root(data: Path) -> Path:
    return Path(load_manifest(data, "captions").provenance["video_root"])


def resolve_compute_dtype(name: str, device: str) -> str:
    if name != "auto":
        return name
    return "bf16" if resolve_device(device).type == "cuda" else "fp32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def local_weights_stamp(model_id: str) -> str | None:
    """For a local checkpoint folder (no revision to pin it): a fingerprint of its weight and config files' names,
    sizes and mtimes, so replacing the weights changes the set. None for tiny and hub models (the revision does)."""
    path = Path(model_id)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return fingerprint([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def model_spec(cfg: FeatureConfig) -> FeatureSpec:
    """The set's identity, from the model's config only (no weights are read)."""
    from transformers import AutoConfig

    from qtsplus.checkpoints import host_model_module
    from qtsplus.tiny import resolve_model

    path, revision = resolve_model(cfg.model_id, cfg.revision)
    host_model_module(path)  # a QTSplus checkpoint's config type is registered by its host model
    config = AutoConfig.from_pretrained(path, revision=None if path != cfg.model_id else revision)
    vc = config.vision_config
    return FeatureSpec(
        model_id=cfg.model_id,
        revision=resolved_revision(cfg.model_id, revision),
        weights=local_weights_stamp(cfg.model_id),
        video=cfg.video,
        compute_dtype=resolve_compute_dtype(cfg.compute_dtype, cfg.device),
        storage_dtype=cfg.storage_dtype,
        hidden_size=vc.out_hidden_size,
        patch_size=vc.patch_size,
        temporal_patch_size=vc.temporal_patch_size,
        merge_size=vc.spatial_merge_size,
    )


# -------------------------------------------------------------------------------------------------- planning


class VideoRef(BaseModel):
    """One video to cache: its path (relative to the video root), content hash and expected token count."""

    video: str
    sha256: str
    tokens: int = Field(description="expected merged tokens (from a probe; 0 if the probe failed)")


class FeaturePlan(BaseModel):
    """What a run will cache: the set, its chunks of videos, and the expected storage."""

    spec: FeatureSpec
    set_id: str
    chunks: dict[int, list[VideoRef]]
    videos: int
    expected_tokens: int
    expected_bytes: int
    missing: dict[str, str] = Field(default_factory=dict, description="video -> why it cannot be read")

    def storage_line(self) -> str:
        s = self.spec
        per_video = self.expected_tokens / max(1, self.videos)
        extra = " + 4 B scale per token" if s.storage_dtype == "fp8" else ""
        return (f"expected storage: {self.videos} videos x {per_video:,.0f} tokens/video x d={s.hidden_size} x "
                f"{s.storage_dtype} ({s.bytes_per_token() // s.hidden_size} B{extra}) = "
                f"{_human(self.expected_bytes)} ({_human(self.expected_bytes / max(1, self.videos))} per video)")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def dataset_videos(data: Path, splits: dict[str, list[str]]) -> dict[int, list[str]]:
    """Video paths per build-dataset chunk, over the named stages' splits; a video is listed at its first chunk."""
    import re

    seen: set[str] = set()
    chunks: dict[int, list[str]] = {}
    files = []
    for stage, wanted in splits.items():
        for f in load_manifest(data, stage).files:
            if f.split in wanted:
                chunk = int(re.search(r"-(\d{5})\.parquet$", f.path).group(1))
                files.append((chunk, f.path))
    for chunk, rel in sorted(files):
        for video in pq.read_table(data / rel, columns=["video"]).column("video").to_pylist():
            if video not in seen:
                seen.add(video)
                chunks.setdefault(chunk, []).append(video)
    return chunks


def expected_tokens(path: Path, sampling: SamplingConfig, merge: int = 2, patch: int = 14) -> int:
    """Merged tokens the vision tower will emit for this video (from its header; no decoding)."""
    meta = probe_video(path, frames_folder_fps=sampling.frames_folder_fps)
    frames = len(sample_frame_indices(meta.num_frames, meta.fps, sampling))
    unit = patch * merge
    h, w = smart_resize(meta.height, meta.width, unit, sampling.min_pixels, sampling.max_pixels)
    return math.ceil(frames / 2) * (h // unit) * (w // unit)


def plan_features(cfg: FeatureConfig, spec: FeatureSpec | None = None) -> FeaturePlan:
    """Videos per chunk with their content hashes, and the storage they will take."""
    data = Path(cfg.data)
    spec = spec or model_spec(cfg)
    video_root = Path(cfg.video_root) if cfg.video_root else dataset_video_root(data)
    chunks: dict[int, list[VideoRef]] = {}
    missing: dict[str, str] = {}
    hashed: set[str] = set()
    for chunk, videos in dataset_videos(data, cfg.splits).items():
        refs = []
        for video in videos:
            try:
                path = resolve_video_path(video_root, video)
                sha = video_sha256(path)
            except (OSError, ValueError) as err:
                missing[video] = f"{type(err).__name__}: {err}"
                continue
            if sha in hashed:  # the same bytes under another name: cached once
                continue
            hashed.add(sha)
            try:
                tokens = expected_tokens(path, cfg.video, spec.merge_size, spec.patch_size)
            except (VideoError, ValueError):
                tokens = 0
            refs.append(VideoRef(video=video, sha256=sha, tokens=tokens))
        if refs:
            chunks[chunk] = refs
    n = sum(len(r) for r in chunks.values())
    tokens = sum(v.tokens for refs in chunks.values() for v in refs)
    return FeaturePlan(spec=spec, set_id=spec.set_id, chunks=chunks, videos=n, expected_tokens=tokens,
                       expected_bytes=tokens * spec.bytes_per_token(), missing=missing)


# ------------------------------------------------------------------------------------------- the vision tower


@dataclass
class VisionTower:
    module: torch.nn.Module  # Qwen2_5_VisionTransformerPretrainedModel (patch embed, blocks, merger)
    sha256: str  # vision_fingerprint of the weights as they compute
    device: torch.device


_TOWERS: dict[tuple, VisionTower] = {}
_TOWER_LOCK = threading.Lock()


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for k, f in weight_map.items() if "visual." in k})
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors(.index.json)")


def load_vision_tower(model_id: str, revision: str | None, compute_dtype: str, device: str = "auto") -> VisionTower:
    """The checkpoint's vision tower alone (its LM weights are never read), in `compute_dtype` on `device`; loaded
    once per process. Same module class, config, attention implementation and weights as the full model's
    `model.visual`, so it computes the same features."""
    key = (model_id, revision, compute_dtype, device)
    with _TOWER_LOCK:
        if key in _TOWERS:
            return _TOWERS[key]
        from safetensors import safe_open
        from transformers import AutoConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        from qtsplus.checkpoints import host_model_module
        from qtsplus.engines import record_load
        from qtsplus.tiny import resolve_model

        path, resolved = resolve_model(model_id, revision)
        host_model_module(path)
        if not Path(path).is_dir():
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=resolved, allow_patterns=["*.json", "*.safetensors"])
        path = Path(path)
        vision_config = AutoConfig.from_pretrained(path).vision_config
        vision_config._attn_implementation = "sdpa"  # what from_pretrained picks for the full model
        module = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config, dtype=torch.float32)
        state = {}
        for file in _weight_files(path):
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    for prefix in ("model.visual.", "visual."):
                        if name.startswith(prefix):
                            state[name.removeprefix(prefix)] = handle.get_tensor(name)
        module.load_state_dict(state, strict=True)
        dev = resolve_device(device)
        module = module.to(device=dev, dtype=TORCH_DTYPES[compute_dtype]).eval().requires_grad_(False)
        tower = _TOWERS[key] = VisionTower(module, vision_fingerprint(module), dev)
        record_load(model_id, resolved_revision(model_id, resolved) or "", "features")
        return tower


@torch.no_grad()
def video_features(visual: torch.nn.Module, inputs: QwenVideoInputs) -> Tensor:
    """[M, d]: the merged vision tokens of one video, as `get_video_features` computes them."""
    param = next(visual.parameters())
    pixels = inputs.pixel_values_videos.to(device=param.device, dtype=param.dtype)
    return visual(pixels, grid_thw=inputs.video_grid_thw.to(param.device)).pooler_output


def compute_video(visual: torch.nn.Module, path: Path, spec: FeatureSpec) -> tuple[Tensor, QwenVideoInputs, list]:
    """Decode one video with the spec's sampling and run the tower: (features [M, d], inputs, frame timestamps)."""
    clip = load_video(path, spec.video)
    inputs = qwen_video_inputs(clip, patch_size=spec.patch_size, temporal_patch_size=spec.temporal_patch_size,
                               merge_size=spec.merge_size)
    return video_features(visual, inputs), inputs, clip.timestamps.tolist()


# ----------------------------------------------------------------------------------------------- shards


class FeatureChunkResult(BaseModel):
    """What one chunk task wrote (small; cached by Prefect)."""

    chunk: int
    set_id: str
    input_fingerprint: str
    files: list[ShardFile] = Field(description="paths relative to the store root")
    entries: list[FeatureEntry]
    failed: dict[str, str] = Field(default_factory=dict, description="video -> decode error")
    vision_sha256: str | None = None
    tokens: int = 0
    replica: dict[str, str] = Field(default_factory=dict, description="the replica that computed it (not in the manifest)")


def shard_file_name(chunk: int) -> str:
    return f"{SHARD_PREFIX}{chunk:05d}.parquet"


def write_feature_shard(folder: Path, chunk: int, rows: list[dict]) -> Path:
    """One Parquet shard, one row group per video (a lookup reads one video), written under a temporary name,
    fsynced and renamed. Feature bytes are stored uncompressed (float bits barely compress)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard_file_name(chunk)
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    compression = {name: ("none" if name in ("features", "scales") else "zstd") for name in SHARD_SCHEMA.names}
    with atomic_file(final) as handle:
        pq.write_table(table, handle, row_group_size=1, compression=compression, use_dictionary=False,
                       write_statistics=False)
    return final


def videos_fingerprint(videos: list[VideoRef]) -> str:
    """A chunk's input: the content hashes of its videos (not their names)."""
    return fingerprint([v.sha256 for v in videos])


def run_feature_chunk(
    out: Path, chunk: int, videos: list[VideoRef], spec: FeatureSpec, video_root: Path, device: str, input_fp: str,
    tower: VisionTower | None = None,
) -> FeatureChunkResult:
    """Compute and write one chunk's shard (in the stage worker: the tower is loaded once per process; `tower`
    overrides it with an in-memory one, e.g. random weights in benchmarks)."""
    tower = tower or load_vision_tower(spec.model_id, spec.revision, spec.compute_dtype, device)
    folder = out / spec.set_id
    rows, entries, failed = [], [], {}
    for ref in videos:
        try:
            features, inputs, timestamps = compute_video(tower.module, resolve_video_path(video_root, ref.video), spec)
        except (VideoError, ValueError, OSError) as err:
            failed[ref.video] = f"{type(err).__name__}: {err}"
            continue
        blob, scales = encode_features(features, spec.storage_dtype)
        digest = features_digest(blob, scales)
        grid = inputs.video_grid_thw[0].tolist()
        entries.append(FeatureEntry(video_sha256=ref.sha256, shard=shard_file_name(chunk), row=len(rows),
                                    num_tokens=features.shape[0], grid_thw=grid, features_sha256=digest))
        rows.append({"video_sha256": ref.sha256, "grid_thw": grid, "second_per_grid_t": inputs.second_per_grid_t,
                     "timestamps": timestamps, "num_tokens": features.shape[0], "dim": features.shape[1],
                     "dtype": spec.storage_dtype, "features": blob, "scales": scales, "features_sha256": digest})
    files = []
    if rows:
        path = write_feature_shard(folder, chunk, rows)
        files.append(ShardFile(path=f"{spec.set_id}/{path.name}", split="features", rows=len(rows),
                               bytes=path.stat().st_size, sha256=file_sha256(path)))
    else:
        (folder / shard_file_name(chunk)).unlink(missing_ok=True)
    return FeatureChunkResult(chunk=chunk, set_id=spec.set_id, input_fingerprint=input_fp, files=files,
                              entries=entries, failed=failed, vision_sha256=tower.sha256,
                              tokens=sum(e.num_tokens for e in entries))


def depends_on(spec: FeatureSpec) -> dict[str, Any]:
    """What a feature chunk depends on besides its videos' bytes: the cache key and the set manifest's code version."""
    return {"spec": canonical(spec), "code_version": code_fingerprint(run_feature_chunk, *model_code(spec.model_id))}


def chunk_shards_verified(out: Path, result: FeatureChunkResult) -> bool:
    """True when every shard a (cached) chunk result names exists with its recorded size and sha256."""
    for shard in result.files:
        path = out / shard.path
        if not path.is_file() or path.stat().st_size != shard.bytes or file_sha256(path) != shard.sha256:
            return False
    return True


def finalize_features(out: Path, spec: FeatureSpec, results: Iterable[FeatureChunkResult],
                      missing: dict[str, str] | None = None) -> FeatureManifest:
    """Write the set's manifest (atomically, after every shard) and remove shards and temporaries no chunk names."""
    results = sorted(results, key=lambda r: r.chunk)
    shas = {r.vision_sha256 for r in results if r.vision_sha256 is not None}
    if len(shas) > 1:
        raise RuntimeError(f"feature set {spec.set_id}: chunks computed by different vision weights {sorted(shas)}")
    folder = out / spec.set_id
    files = [f for r in results for f in r.files]
    manifest = FeatureManifest(
        set_id=spec.set_id, spec=spec, vision_sha256=next(iter(shas), None), files=files,
        videos={e.video_sha256: e for r in results for e in r.entries},
        failed=dict(sorted(((missing or {}) | {k: v for r in results for k, v in r.failed.items()}).items())),
        bytes=sum(f.bytes for f in files), code_version=depends_on(spec)["code_version"],
    )
    referenced = {Path(f.path).name for f in files}
    if folder.is_dir():
        for path in folder.iterdir():
            stale = path.name.startswith(TMP_PREFIX) or (path.name.startswith(SHARD_PREFIX)
                                                          and path.name not in referenced)
            if stale:
                path.unlink()
    write_text_atomic(folder / MANIFEST, manifest.model_dump_json(indent=1) + "\n")
    return manifest


def build_feature_set(cfg: FeatureConfig, spec: FeatureSpec | None = None,
                      tower: VisionTower | None = None) -> FeatureManifest:
    """A whole set in this process, without Prefect (no task cache, no resume): plan, compute every chunk, finalize.
    For tests, benchmarks and notebooks; `qtsplus cache-features` is the cached, resumable way."""
    data = Path(cfg.data)
    out = store_root(cfg)
    spec = spec or model_spec(cfg)
    plan = plan_features(cfg, spec)
    video_root = Path(cfg.video_root) if cfg.video_root else dataset_video_root(data)
    results = [run_feature_chunk(out, chunk, refs, spec, video_root, cfg.device, videos_fingerprint(refs), tower)
               for chunk, refs in sorted(plan.chunks.items())]
    return finalize_features(out, spec, results, plan.missing)
