"""Video I/O for QTSplus: safe path resolution, probing, fps sampling, Qwen2.5-VL resizing and pixel packing.

Decoding uses decord when it is installed and works, PyAV otherwise; a folder of image files is read as a
video whose native frame rate is given by the caller. Frame sampling follows qwen-vl-utils
(``smart_nframes``), frame resizing follows Qwen2.5-VL's ``smart_resize`` with PIL bicubic, and
:func:`qwen_video_inputs` packs frames exactly as transformers' Qwen2-VL processors do, so this module needs
no torchvision.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # optional / lazily imported decoders; torch only where pixels are packed (cached runs skip it)
    import av
    import decord
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PathOutsideRoot",
    "ProbeCheck",
    "QwenVideoInputs",
    "SamplingConfig",
    "VideoClip",
    "VideoError",
    "VideoMeta",
    "list_frame_files",
    "load_video",
    "probe_video",
    "qwen_video_inputs",
    "resolve_video_path",
    "sample_frame_indices",
    "smart_resize",
]

log = logging.getLogger(__name__)

Backend = Literal["auto", "decord", "pyav"]
# how hard probe_video looks: "open" the container (decord also reads every packet when it opens a file) or the first
# image; "scan" also reads every packet with PyAV and decodes every image of a frames folder at reduced size;
# "decode" also decodes every frame of a file (PyAV) and every image at full size
ProbeCheck = Literal["open", "scan", "decode"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_FACTOR = 28  # patch_size * merge_size of Qwen2.5-VL's vision tower
FRAME_FACTOR = 2  # temporal patch size
MAX_RATIO = 200
PYAV_FRAME_COUNT_SLACK = 2  # header frame counts this much too high are tolerated, not called truncation


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are sampled and resized; defaults follow the QTSplus paper's training setup."""

    fps: float = 1.0
    min_frames: int = 4
    max_frames: int = 40
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 360 * 420
    frames_folder_fps: float = 1.0

    def __post_init__(self) -> None:
        if not self.fps > 0 or not self.frames_folder_fps > 0:
            raise ValueError("fps and frames_folder_fps must be positive")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.min_pixels < 1 or self.max_pixels < self.min_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")


@dataclass(frozen=True)
class VideoMeta:
    """Cheap metadata of a video file or frames folder; ``duration`` is ``num_frames / fps``."""

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    backend: str  # "decord" | "pyav" | "frames"


@dataclass
class VideoClip:
    """Sampled, resized frames of one video.

    ``sample_fps`` (frames kept per second of video, as qwen-vl-utils reports it) and ``backend`` are
    additions to the documented interface; both have defaults so a clip can be built from the four
    documented fields.
    """

    frames: np.ndarray  # uint8 [T, H, W, 3], T even, H and W multiples of 28
    timestamps: np.ndarray  # float64 [T], seconds from the start of the video
    native_fps: float
    source: str
    sample_fps: float | None = None
    backend: str = "unknown"


@dataclass
class QwenVideoInputs:
    """What Qwen2.5-VL's forward pass takes for one video, plus the prompt's ``<|video_pad|>`` count."""

    pixel_values_videos: torch.Tensor  # float32 [t*h*w, 3*2*14*14]
    video_grid_thw: torch.Tensor  # long [1, 3]
    second_per_grid_t: float
    num_video_tokens: int


class VideoError(Exception):
    """A video (or frames folder) is missing, empty, truncated or cannot be decoded."""


class PathOutsideRoot(ValueError):
    """A data path escapes the root directory it must stay in."""


# ---------------------------------------------------------------------------------------------- paths


def resolve_video_path(root: Path | str, rel: str | Path) -> Path:
    """Resolve ``rel`` against ``root`` (symlinks followed); raise :class:`PathOutsideRoot` if it escapes.

    Absolute paths are accepted only when they lie inside ``root``. The file need not exist.
    """
    root_resolved = Path(root).resolve()
    rel_path = Path(rel)
    candidate = rel_path if rel_path.is_absolute() else root_resolved / rel_path
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root_resolved):
        raise PathOutsideRoot(f"{str(rel)!r} resolves to {resolved}, outside the root {root_resolved}")
    return resolved


# ------------------------------------------------------------------------------------ sizes and sampling


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of ``factor`` with area in [min_pixels, max_pixels].

    Same rule, defaults and ValueError (aspect ratio above 200) as transformers' ``smart_resize``.
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(
    total_frames: int, native_fps: float, cfg: SamplingConfig, *, frame_factor: int = FRAME_FACTOR
) -> np.ndarray:
    """Indices of the frames to keep, as qwen-vl-utils' ``smart_nframes`` + ``linspace`` choose them.

    n = duration * cfg.fps clipped to [min_frames rounded up, max_frames rounded down] (both to multiples of
    ``frame_factor``), then floored to a multiple of ``frame_factor``; indices = round(linspace(0, N-1, n)).
    If the video has fewer frames than that, every frame is kept and the last one is repeated up to a
    multiple of ``frame_factor`` (qwen-vl-utils would refuse a one-frame video).
    """
    if total_frames < 1:
        raise VideoError("video has no frames")
    if not native_fps > 0:
        raise VideoError(f"invalid native frame rate {native_fps!r}")
    min_f = math.ceil(cfg.min_frames / frame_factor) * frame_factor
    max_f = max(frame_factor, math.floor(cfg.max_frames / frame_factor) * frame_factor)
    wanted = total_frames / native_fps * cfg.fps
    n = math.floor(min(max(wanted, min_f), max_f) / frame_factor) * frame_factor
    if n <= total_frames:
        return np.linspace(0, total_frames - 1, n).round().astype(np.int64)
    indices = np.arange(total_frames, dtype=np.int64)
    pad = -total_frames % frame_factor
    return np.concatenate([indices, np.full(pad, total_frames - 1, dtype=np.int64)])


# ----------------------------------------------------------------------------------- frames folders


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: Path) -> list[Path]:
    """Image files of a frames folder (jpg, jpeg, png, webp, bmp; hidden files skipped), in natural order."""
    files = [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _check_image(path: Path, index: int, count: int, full: bool) -> None:
    """Decode one image (JPEG at 1/8 size through PIL's `draft` unless `full`: the same entropy decoding, so the
    same errors, at a fraction of the cost); VideoError naming the frame if it does not decode."""
    try:
        with Image.open(path) as img:
            if full:
                img.convert("RGB")
            else:
                img.draft(None, (1, 1))
                img.load()
    except _IMAGE_ERRORS as e:
        raise VideoError(f"{path}: frame {index} of {count} does not decode: {e}") from e


def _probe_frames_folder(folder: Path, fps: float, check: ProbeCheck = "open") -> VideoMeta:
    files = list_frame_files(folder)
    if not files:
        raise VideoError(f"{folder}: folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    try:
        with Image.open(files[0]) as img:
            width, height = img.size
    except _IMAGE_ERRORS as e:
        raise VideoError(f"{files[0]}: cannot read image: {e}") from e
    if check != "open":
        for i, file in enumerate(files):
            _check_image(file, i, len(files), full=check == "decode")
    return VideoMeta(len(files), float(fps), len(files) / fps, width, height, "frames")


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise VideoError(f"{path}: cannot read image: {e}") from e


# ------------------------------------------------------------------------------------------- decoders


def _decord_available() -> bool:
    return importlib.util.find_spec("decord") is not None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"{path}: no such file")
    if not path.is_file():
        raise VideoError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")


def _decord_errors() -> tuple[type[BaseException], ...]:
    from decord._ffi.base import DECORDError

    return (DECORDError, RuntimeError, OSError, ValueError, IndexError)


def _open_decord(path: Path) -> decord.VideoReader:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except _decord_errors() as e:
        raise VideoError(f"{path}: decord cannot open the file: {_first_line(e)}") from e
    if len(reader) < 1:
        raise VideoError(f"{path}: decord found no frames")
    return reader


def _probe_decord(path: Path) -> VideoMeta:
    reader = _open_decord(path)
    try:
        fps = float(reader.get_avg_fps())
        height, width = reader[0].shape[:2]
    except _decord_errors() as e:
        raise VideoError(f"{path}: decord cannot decode the file: {_first_line(e)}") from e
    if not fps > 0 or not math.isfinite(fps):
        raise VideoError(f"{path}: decord reports an invalid frame rate {fps!r}")
    n = len(reader)
    return VideoMeta(n, fps, n / fps, int(width), int(height), "decord")


def _decode_decord(path: Path, cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Frames, indices, native fps and frame count decoded with decord."""
    reader = _open_decord(path)
    total = len(reader)
    fps = float(reader.get_avg_fps())
    if not fps > 0 or not math.isfinite(fps):
        raise VideoError(f"{path}: decord reports an invalid frame rate {fps!r}")
    indices = sample_frame_indices(total, fps, cfg)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except _decord_errors() as e:
        raise VideoError(f"{path}: decord cannot decode the file (truncated?): {_first_line(e)}") from e
    return frames, indices, fps, total


def _pyav_stream_info(path: Path) -> tuple[av.container.InputContainer, av.VideoStream, float]:
    """Open ``path`` with PyAV; returns the container (caller closes it), its first video stream and fps."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: PyAV cannot open the file: {_first_line(e)}") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        container.close()
        raise VideoError(f"{path}: PyAV finds no frame rate")
    return container, stream, fps


def _pyav_header(path: Path) -> tuple[int, float, int, int]:
    """(frames, fps, width, height) from the container header; frames counted from packets if absent."""
    import av

    container, stream, fps = _pyav_stream_info(path)
    with container:
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        n = int(stream.frames)
        if n < 1:
            try:
                n = sum(1 for packet in container.demux(stream) if packet.size > 0)
            except (av.FFmpegError, OSError, ValueError) as e:
                raise VideoError(f"{path}: PyAV cannot read the file: {_first_line(e)}") from e
    if n < 1 or width < 1 or height < 1:
        raise VideoError(f"{path}: PyAV finds no frames")
    return n, fps, width, height


def _probe_pyav(path: Path) -> VideoMeta:
    n, fps, width, height = _pyav_header(path)
    return VideoMeta(n, fps, n / fps, width, height, "pyav")


def _check_stream(path: Path, header_frames: int, decode: bool) -> None:
    """Read every packet of the first video stream (and decode every frame if `decode`); VideoError if reading
    fails or finds fewer frames than the header promises (beyond the slack decoding tolerates): a truncated file
    whose header survived, or (decoding) corrupt data inside an intact container."""
    import av

    container, stream, _ = _pyav_stream_info(path)
    count, what = 0, "frames decode" if decode else "packets read"
    with container:
        try:
            if decode:
                for _ in container.decode(stream):
                    count += 1
            else:
                count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{path}: PyAV fails after {count} {what}: {_first_line(e)}") from e
    if count < 1 or header_frames - count > PYAV_FRAME_COUNT_SLACK:
        raise VideoError(f"{path}: header says {header_frames} frames but only {count} {what} (truncated?)")


def _pyav_decode_indices(path: Path, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Decode in presentation order, keeping the wanted frames; returns them and how many frames were seen."""
    import av

    wanted = set(indices.tolist())
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    seen = 0
    container, stream, _ = _pyav_stream_info(path)
    with container:
        # frame threading ("AUTO") would swallow the decode error a truncated file raises at its end
        try:
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(
                f"{path}: PyAV cannot decode the file after {seen} frames (truncated?): {_first_line(e)}"
            ) from e
    return kept, seen


def _decode_pyav(path: Path, cfg: SamplingConfig) -> tuple[list[np.ndarray], np.ndarray, float, int]:
    """Frames, indices, native fps and frame count decoded with PyAV."""
    total, fps, _, _ = _pyav_header(path)
    indices = sample_frame_indices(total, fps, cfg)
    kept, seen = _pyav_decode_indices(path, indices)
    if len(kept) < len(set(indices.tolist())):
        if seen < 1 or total - seen > PYAV_FRAME_COUNT_SLACK:
            raise VideoError(f"{path}: header says {total} frames but only {seen} decode (truncated?)")
        # the header over-counted by a frame or two: sample again over the frames that really decode
        log.warning("%s: header says %d frames, %d decode; resampling", path, total, seen)
        total = seen
        indices = sample_frame_indices(total, fps, cfg)
        kept, _ = _pyav_decode_indices(path, indices)
    return [kept[int(i)] for i in indices], indices, fps, total


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    if backend == "decord" and not _decord_available():
        raise VideoError("decord was requested but is not installed (pip install decord)")


# --------------------------------------------------------------------------------------------- public


def probe_video(
    path: Path | str, *, frames_folder_fps: float = 1.0, backend: Backend = "auto", check: ProbeCheck = "open"
) -> VideoMeta:
    """Metadata for a video file (decord, else PyAV) or a folder of frames; raises VideoError.

    `check` says how much is read to find a video that would fail to decode later: "open" (cheap: the header, the
    first frame or image), "scan" (also every packet of a file, every image of a folder decoded at reduced size) or
    "decode" (also every frame of a file and every image at full size: about the cost of decoding the whole video).
    """
    path = Path(path)
    _check_backend(backend)
    if check not in ("open", "scan", "decode"):
        raise ValueError(f"check must be 'open', 'scan' or 'decode', got {check!r}")
    if path.is_dir():
        return _probe_frames_folder(path, frames_folder_fps, check)
    _check_file(path)
    if backend == "pyav" or (backend == "auto" and not _decord_available()):
        meta = _probe_pyav(path)
    elif backend == "decord":
        meta = _probe_decord(path)
    else:
        try:
            meta = _probe_decord(path)
        except VideoError as decord_error:
            try:
                meta = _probe_pyav(path)
                if check != "open":
                    _check_stream(path, meta.num_frames, decode=check == "decode")
            except VideoError as pyav_error:
                raise VideoError(f"{decord_error}; {pyav_error}") from pyav_error
            return meta
    # decord reads every packet when it opens a file: "scan" adds nothing to a decord probe
    if check == "decode" or (check == "scan" and meta.backend == "pyav"):
        _check_stream(path, meta.num_frames, decode=check == "decode")
    return meta


def _resize_frames(frames: Sequence[np.ndarray] | np.ndarray, cfg: SamplingConfig, source: str) -> np.ndarray:
    """Resize every frame to smart_resize of the first frame's size, PIL bicubic; uint8 [T, H, W, 3]."""
    h0, w0 = frames[0].shape[:2]
    try:
        th, tw = smart_resize(h0, w0, IMAGE_FACTOR, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:
        raise VideoError(f"{source}: frames of {w0}x{h0} cannot be resized: {e}") from e
    out = np.empty((len(frames), th, tw, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        if frame.shape[:2] == (th, tw):
            out[i] = frame
        else:
            out[i] = np.asarray(Image.fromarray(frame).resize((tw, th), Image.Resampling.BICUBIC))
    return out


def load_video(
    path: Path | str, cfg: SamplingConfig | None = None, *, backend: Backend = "auto"
) -> VideoClip:
    """Sample frames by ``cfg.fps`` (qwen-vl-utils rule), decode and resize them for Qwen2.5-VL.

    ``path`` is a video file (``backend`` "auto": decord, then PyAV if decord is missing or fails) or a
    folder of image files read at ``cfg.frames_folder_fps``. Decoder failures raise VideoError.
    """
    cfg = cfg or SamplingConfig()
    path = Path(path)
    _check_backend(backend)
    if path.is_dir():
        files = list_frame_files(path)
        if not files:
            raise VideoError(f"{path}: folder holds no image files")
        fps = float(cfg.frames_folder_fps)
        indices = sample_frame_indices(len(files), fps, cfg)
        decoded = {int(i): _read_image(files[int(i)]) for i in np.unique(indices)}
        raw = [decoded[int(i)] for i in indices]
        total, used = len(files), "frames"
    else:
        _check_file(path)
        if backend == "pyav" or (backend == "auto" and not _decord_available()):
            raw, indices, fps, total = _decode_pyav(path, cfg)
            used = "pyav"
        elif backend == "decord":
            raw, indices, fps, total = _decode_decord(path, cfg)
            used = "decord"
        else:
            try:
                raw, indices, fps, total = _decode_decord(path, cfg)
                used = "decord"
            except VideoError as decord_error:
                log.warning("decord failed, trying PyAV: %s", decord_error)
                try:
                    raw, indices, fps, total = _decode_pyav(path, cfg)
                except VideoError as pyav_error:
                    raise VideoError(f"{decord_error}; {pyav_error}") from pyav_error
                used = "pyav"
    frames = _resize_frames(raw, cfg, str(path))
    return VideoClip(
        frames=frames,
        timestamps=indices.astype(np.float64) / fps,
        native_fps=fps,
        source=str(path),
        sample_fps=len(indices) / (total / fps),
        backend=used,
    )


def qwen_video_inputs(
    clip: VideoClip, *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> QwenVideoInputs:
    """Pack a clip as transformers' Qwen2-VL processors do: rescale, CLIP-normalise, patchify.

    Row order is (t, h-block, w-block, merge-row, merge-col); each row is (channel, time, py, px) flattened.
    An odd frame count is padded by repeating the last frame. Frames must already be resized.
    """
    frames = np.asarray(clip.frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"clip.frames must be [T, H, W, 3], got shape {frames.shape}")
    t, h, w, c = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {unit}; resize with smart_resize first")
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32)
    x = x * (1.0 / 255.0)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(1, c, 1, 1)
    x = (x - mean) / std
    if pad := -t % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
    grid_t = x.shape[0] // temporal_patch_size
    grid_h, grid_w = h // patch_size, w // patch_size
    x = x.reshape(
        grid_t,
        temporal_patch_size,
        c,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(grid_t * grid_h * grid_w, c * temporal_patch_size * patch_size * patch_size)
    sample_fps = clip.sample_fps or _estimate_sample_fps(clip)
    return QwenVideoInputs(
        pixel_values_videos=pixel_values.contiguous(),
        video_grid_thw=torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long),
        second_per_grid_t=float(temporal_patch_size / sample_fps),
        num_video_tokens=grid_t * grid_h * grid_w // merge_size**2,
    )


def _estimate_sample_fps(clip: VideoClip) -> float:
    """Sampled frames per second when a clip does not carry it: from its timestamps, else its native fps."""
    ts = np.asarray(clip.timestamps, dtype=np.float64)
    if ts.size >= 2 and ts[-1] > ts[0]:
        return float((ts.size - 1) / (ts[-1] - ts[0]))
    return float(clip.native_fps)
