"""Reading a feature store: content hashes of videos, the on-disk format, and verified lookups.

A store is a folder of feature sets. A set holds the vision-tower outputs of many videos for one `FeatureSpec` (vision
model id and revision, frame sampling, compute and storage dtype, patch geometry); its folder is the spec's
fingerprint:

    <store>/<set_id>/features-<chunk:05d>.parquet    one row (and one row group) per video
    <store>/<set_id>/manifest.json                   FeatureManifest: spec, vision-weights sha256, shards (sha256),
                                                     and per video (by content sha256): shard, row, features sha256

A lookup hashes the video's bytes (memoised per process by path, size, mtime and inode), finds the entry in the
manifest, reads that one row group and checks the sha256 of its feature bytes against the manifest before decoding.
Any miss or mismatch (video not cached, shard missing, unreadable or changed) returns None: the caller decodes the
video and runs the vision tower instead, so a damaged store is never used, only bypassed.

A training run reads the same videos every epoch, a row at a time. Opening a shard parses its footer (one row group
per video, so the footer grows with the shard) and was the largest single cost of a needle training step (15% of it,
the whole feature read 25%). A `FeatureSet` therefore keeps its most recently used shards open (`open_files`) and the
features it has verified in memory up to `memo_bytes`: a video is read and checked once per process, and every later
lookup returns a copy of what was verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from qtsplus.features.config import FEATURES_DIR, STORAGE_BYTES, StorageDtype
from qtsplus.fingerprint import file_sha256, fingerprint
from qtsplus.shards import ShardFile
from qtsplus.tiny import TINY_MODEL_IDS, tiny_hash
from qtsplus.video import SamplingConfig, VideoClip, list_frame_files

log = logging.getLogger(__name__)

FEATURES_VERSION = "1"  # bump when the shard layout or the meaning of a stored row changes
MANIFEST = "manifest.json"
SHARD_PREFIX = "features-"
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                        "fp8": torch.float8_e4m3fn}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
COLUMNS = ["video_sha256", "grid_thw", "second_per_grid_t", "timestamps", "num_tokens", "dim", "dtype", "features",
           "scales", "features_sha256"]


class FeatureSpec(BaseModel):
    """What the stored tensors depend on besides the video: a set's identity (its folder is `set_id`)."""

    model_id: str
    revision: str | None = Field(description="resolved revision (the config hash for tiny models)")
    weights: str | None = Field(None, description="stat fingerprint of a local checkpoint's weight files")
    video: SamplingConfig
    compute_dtype: Literal["fp32", "bf16", "fp16"]
    storage_dtype: StorageDtype
    hidden_size: int = Field(description="d: width of the merged vision tokens (the LM's hidden size)")
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    version: str = FEATURES_VERSION

    @property
    def set_id(self) -> str:
        return fingerprint("qtsplus-features", self)[:16]

    @property
    def lossless(self) -> bool:
        """True when storage does not round what the vision tower computed."""
        return self.storage_dtype == "fp32" or self.storage_dtype == self.compute_dtype

    def bytes_per_token(self) -> int:
        return self.hidden_size * STORAGE_BYTES[self.storage_dtype] + (4 if self.storage_dtype == "fp8" else 0)


class FeatureEntry(BaseModel):
    """Where one video's features are, and the sha256 their bytes must have."""

    video_sha256: str
    shard: str = Field(description="file name inside the set folder")
    row: int
    num_tokens: int
    grid_thw: list[int]
    features_sha256: str


class FeatureManifest(BaseModel):
    """A feature set's manifest: spec, vision weights, every shard with its sha256, every video's entry."""

    set_id: str
    spec: FeatureSpec
    vision_sha256: str | None = Field(description="sha256 of the vision tower's weights that computed the features")
    files: list[ShardFile]
    videos: dict[str, FeatureEntry] = Field(description="by video content sha256")
    failed: dict[str, str] = Field(default_factory=dict, description="video path -> why it could not be cached")
    bytes: int
    code_version: str


@dataclass
class VideoFeatures:
    """One video's cached vision-tower output, with what the LM needs to place it."""

    features: Tensor  # [M, d] in the storage dtype (fp32 for fp8 storage, dequantised)
    grid_thw: Tensor  # long [1, 3]: (T/2, H/14, W/14), as `video_grid_thw`
    second_per_grid_t: float
    timestamps: np.ndarray  # float64 [T]: seconds of the sampled frames
    video_sha256: str

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


# ----------------------------------------------------------------------------------------- content hashes

_HASHES: dict[tuple, str] = {}


def video_sha256(path: Path | str) -> str:
    """Content hash of a video: sha256 of the file's bytes; for a folder of frames, of the frame files that
    `load_video` reads (image files in natural order), name and bytes. Memoised per process by (path, size,
    mtime, inode) of every file involved."""
    path = Path(path)
    if path.is_dir():
        frames = list_frame_files(path)
        stats = tuple((f.name, *_stat(f)) for f in frames)
        key = (str(path.resolve()), stats)
        if key not in _HASHES:
            h = hashlib.sha256(b"qtsplus-frames-v1\0")
            for f in frames:
                h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\0")
            _HASHES[key] = h.hexdigest()
        return _HASHES[key]
    key = (str(path.resolve()), *_stat(path))
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def _stat(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def vision_fingerprint(visual: torch.nn.Module) -> str:
    """sha256 of a vision tower's weights exactly as they compute (names, dtypes, shapes, bytes): two towers with
    the same fingerprint give the same features."""
    h = hashlib.sha256(b"qtsplus-vision-v1\0")
    for name, tensor in sorted(visual.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolved_revision(model_id: str, revision: str | None) -> str | None:
    """The revision a feature set records: the config hash for tiny models, else the given one."""
    if model_id in TINY_MODEL_IDS:
        return tiny_hash(model_id.removeprefix("tiny/"))
    return revision


# ------------------------------------------------------------------------------------------ tensor format


def encode_features(x: Tensor, storage: str) -> tuple[bytes, bytes | None]:
    """[M, d] -> (raw little-endian bytes in the storage dtype, fp32 per-token scales for fp8 else None)."""
    x = x.detach().to("cpu")
    if storage == "fp8":
        x = x.float()
        scale = (x.abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (x / scale[:, None]).to(torch.float8_e4m3fn)
        return _raw(q), _raw(scale)
    return _raw(x.to(TORCH_DTYPES[storage])), None


def decode_features(blob: bytes, scales: bytes | None, storage: str, num_tokens: int, dim: int) -> Tensor:
    """Inverse of `encode_features`: [M, d] in the storage dtype (fp32 for fp8, dequantised)."""
    x = torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(TORCH_DTYPES[storage]).reshape(num_tokens, dim)
    if storage == "fp8":
        s = torch.frombuffer(bytearray(scales or b""), dtype=torch.float32)
        return x.float() * s[:, None]
    return x


def features_digest(blob: bytes, scales: bytes | None) -> str:
    h = hashlib.sha256(blob)
    if scales is not None:
        h.update(scales)
    return h.hexdigest()


def _raw(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------------------------- reading


class FeatureSet:
    """One set of a store: verified lookups of videos' features."""

    def __init__(self, folder: Path, manifest: FeatureManifest, open_files: int = 8, memo_bytes: int = 256 * 2**20):
        """open_files: shards kept open (least recently used closed first); memo_bytes: verified features kept in
        memory (least recently used dropped first). 0 turns either off: every lookup opens, reads and checks."""
        self.folder = Path(folder)
        self.manifest = manifest
        self.spec = manifest.spec
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # found in the manifest but unreadable or not matching its checksum
        self.open_files, self.memo_bytes = open_files, memo_bytes
        self._files: OrderedDict[str, object] = OrderedDict()  # shard name -> pyarrow.parquet.ParquetFile
        self._memo: OrderedDict[str, VideoFeatures] = OrderedDict()  # video sha256 -> verified features
        self._memo_size = 0

    def __repr__(self) -> str:
        return (f"FeatureSet({self.folder}, {self.spec.model_id}, {self.spec.storage_dtype}, "
                f"{len(self.manifest.videos)} videos)")

    def get(self, video_path: Path | str) -> VideoFeatures | None:
        """The video's features, or None when it is not cached or its stored bytes do not verify."""
        try:
            sha = video_sha256(video_path)
        except OSError:
            self.misses += 1
            return None
        return self.get_by_sha(sha)

    def get_by_sha(self, sha: str) -> VideoFeatures | None:
        entry = self.manifest.videos.get(sha)
        if entry is None:
            self.misses += 1
            return None
        if sha in self._memo:
            self._memo.move_to_end(sha)
            self.hits += 1
            return self._copy(self._memo[sha])
        try:
            row = read_feature_row(self.folder / entry.shard, entry.row, self._shard(entry.shard))
            ok = (row["video_sha256"] == sha and row["dtype"] == self.spec.storage_dtype
                  and row["num_tokens"] == entry.num_tokens and row["dim"] == self.spec.hidden_size
                  and features_digest(row["features"], row["scales"]) == entry.features_sha256)
            if not ok:
                raise ValueError("checksum or shape mismatch")
            features = decode_features(row["features"], row["scales"], row["dtype"], row["num_tokens"], row["dim"])
        except Exception as err:  # noqa: BLE001 - any unreadable or altered row is a miss, never an error
            self.rejected += 1
            log.warning("feature cache: %s row %d rejected (%s); computing the video instead", entry.shard,
                        entry.row, err)
            return None
        self.hits += 1
        found = VideoFeatures(
            features=features,
            grid_thw=torch.tensor([row["grid_thw"]], dtype=torch.long),
            second_per_grid_t=float(row["second_per_grid_t"]),
            timestamps=np.asarray(row["timestamps"], dtype=np.float64),
            video_sha256=sha,
        )
        self._remember(sha, found)
        return self._copy(found) if sha in self._memo else found

    @staticmethod
    def _copy(found: VideoFeatures) -> VideoFeatures:
        """What a lookup of a remembered video returns: callers may write into what they get."""
        return replace(found, features=found.features.clone())

    def _shard(self, name: str):
        """The open pyarrow ParquetFile of a shard (None when open_files is 0: read_feature_row opens it)."""
        if self.open_files <= 0:
            return None
        if name in self._files:
            self._files.move_to_end(name)
            return self._files[name]
        import pyarrow.parquet as pq

        handle = self._files[name] = pq.ParquetFile(self.folder / name)
        while len(self._files) > self.open_files:
            self._files.popitem(last=False)[1].close()
        return handle

    def _remember(self, sha: str, found: VideoFeatures) -> None:
        size = found.features.nbytes
        if size > self.memo_bytes:
            return
        self._memo[sha] = found
        self._memo_size += size
        while self._memo_size > self.memo_bytes:
            self._memo_size -= self._memo.popitem(last=False)[1].features.nbytes

    def close(self) -> None:
        """Close the open shards and forget the remembered features."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        self._memo.clear()
        self._memo_size = 0


def read_feature_row(path: Path, row: int, handle=None) -> dict:
    """One video's row (its own row group) of a feature shard, binary columns as bytes; `handle`: the shard already
    open (a pyarrow ParquetFile), else it is opened for this read."""
    import pyarrow.parquet as pq

    table = (handle or pq.ParquetFile(path)).read_row_group(row, columns=COLUMNS)
    if table.num_rows != 1:
        raise ValueError(f"{path}: row group {row} holds {table.num_rows} rows")
    return {name: table.column(name)[0].as_py() for name in COLUMNS}


class FeatureStore:
    """A folder of feature sets. `find` picks the set for a consumer; `get` is a one-call lookup."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._sets: dict[str, FeatureSet] | None = None

    def sets(self) -> list[FeatureSet]:
        """Every readable set (folders whose manifest parses); read once per store object."""
        if self._sets is None:
            self._sets = {}
            if self.root.is_dir():
                for path in sorted(self.root.glob(f"*/{MANIFEST}")):
                    try:
                        manifest = FeatureManifest.model_validate_json(path.read_text())
                    except (OSError, ValueError) as err:
                        log.warning("feature cache: %s unreadable (%s); ignored", path, err)
                        continue
                    if manifest.spec.version == FEATURES_VERSION and manifest.set_id == path.parent.name:
                        self._sets[manifest.set_id] = FeatureSet(path.parent, manifest)
        return list(self._sets.values())

    def find(
        self,
        sampling: SamplingConfig,
        *,
        vision_sha256: str | None = None,
        model_id: str | None = None,
        revision: str | None = None,
        lossless: bool = False,
        compute_dtype: str | None = None,
    ) -> FeatureSet | None:
        """The set with this frame sampling computed by this vision tower: by the tower's weights fingerprint when
        given (robust to renamed checkpoints: a QTSplus checkpoint shares its base's frozen tower), else by model
        id and revision. Among several, lossless storage first, then the widest storage dtype."""
        if vision_sha256 is None and model_id is None:
            raise ValueError("find() needs vision_sha256 or model_id")
        revision = resolved_revision(model_id, revision) if model_id is not None else None
        candidates = []
        for s in self.sets():
            spec = s.spec
            if spec.video != sampling or (lossless and not spec.lossless):
                continue
            if compute_dtype is not None and spec.compute_dtype != compute_dtype:
                continue
            if vision_sha256 is not None:
                if s.manifest.vision_sha256 != vision_sha256:
                    continue
            elif (spec.model_id, spec.revision) != (model_id, revision):
                continue
            candidates.append(s)
        if not candidates:
            return None
        return max(candidates, key=lambda s: (s.spec.lossless, STORAGE_BYTES[s.spec.storage_dtype],
                                              len(s.manifest.videos)))

    def get(
        self, video_path: Path | str, sampling: SamplingConfig, model_id: str, revision: str | None = None
    ) -> VideoFeatures | None:
        """One video's verified features for (sampling, model id, revision), or None."""
        found = self.find(sampling, model_id=model_id, revision=revision)
        return found.get(video_path) if found is not None else None


# ------------------------------------------------------------------------------------------------ consumers


def feature_store_root(setting: str | None, data: Path) -> Path | None:
    """Where `TrainConfig.features` / `EvalConfig.features` point: None (off), <data>/features (auto) or a folder."""
    if setting is None or setting == "off":
        return None
    if setting == "auto":
        root = Path(data) / FEATURES_DIR
        return root if root.is_dir() else None
    return Path(setting)


def open_feature_set(
    setting: str | None, data: Path, sampling: SamplingConfig, visual: torch.nn.Module, lossless: bool = False
) -> FeatureSet | None:
    """The store's set for this sampling computed by exactly this vision tower (same weights in the same dtype, by
    `vision_fingerprint`), or None (no store, no such set: every video is decoded). Says which on stdout."""
    root = feature_store_root(setting, data)
    if root is None:
        return None
    found = FeatureStore(root).find(sampling, vision_sha256=vision_fingerprint(visual), lossless=lossless)
    if found is None:
        kind = "lossless set" if lossless else "set"
        print(f"feature cache: {root} has no {kind} for this sampling and vision tower; decoding videos", flush=True)
    else:
        print(f"feature cache: {found}", flush=True)
    return found


def video_prompt_ids(tokenizer, user: str, video_token_id: int, num_video_tokens: int) -> list[int]:
    """The token ids `encode_prompt` gives a video prompt whose video has `num_video_tokens` tokens, without
    decoding the video (same chat template, <|video_pad|> repeated)."""
    from qtsplus.engines import Prompt
    from qtsplus.engines.chat import render_prompt

    ids = tokenizer.encode(render_prompt(tokenizer, Prompt(user=user, video=_CACHED_VIDEO)), add_special_tokens=False)
    if ids.count(video_token_id) != 1:
        raise ValueError("prompt text must not contain <|video_pad|>: the video is placed by the encoder")
    at = ids.index(video_token_id)
    return ids[:at] + [video_token_id] * num_video_tokens + ids[at + 1 :]


# marks "this prompt has a video" for the chat template (which never looks at the frames)
_CACHED_VIDEO = VideoClip(frames=np.zeros((0, 28, 28, 3), np.uint8), timestamps=np.zeros(0), native_fps=1.0,
                          source="cached features")
