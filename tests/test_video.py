"""Tests for qtsplus.video: path safety, probing, qwen-vl-utils sampling, decoders and Qwen2-VL pixel packing."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qtsplus import video
from qtsplus.video import (
    PathOutsideRoot,
    SamplingConfig,
    VideoClip,
    VideoError,
    load_video,
    probe_video,
    qwen_video_inputs,
    resolve_video_path,
    sample_frame_indices,
    smart_resize,
)

try:  # the canonical copy needs torchvision, which CPU machines lack; the PIL module carries a verbatim copy
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
except ImportError:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "videos"
MP4S = ["bigbuckbunny.mp4", "bikes.mp4", "carphone.mp4"]
FILES = [*MP4S, "bigbuckbunny.webm"]
FRAMES_DIR = EXAMPLES / "carphone_frames"


# ------------------------------------------------------------------------------------------------ paths


def test_resolve_inside_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "v.mp4").write_bytes(b"x")
    root = tmp_path.resolve()
    assert resolve_video_path(tmp_path, "a/v.mp4") == root / "a" / "v.mp4"
    assert resolve_video_path(tmp_path, "a/../a/v.mp4") == root / "a" / "v.mp4"
    assert resolve_video_path(tmp_path, str(tmp_path / "a" / "v.mp4")) == root / "a" / "v.mp4"
    assert resolve_video_path(str(tmp_path), "missing.mp4") == root / "missing.mp4"  # need not exist


@pytest.mark.parametrize("rel", ["../x.mp4", "a/../../x.mp4", "a/../../../etc/passwd", "/etc/passwd"])
def test_resolve_rejects_escapes(tmp_path: Path, rel: str) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(PathOutsideRoot):
        resolve_video_path(tmp_path / "a", rel)


def test_resolve_rejects_absolute_sibling_with_common_prefix(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(PathOutsideRoot):
        resolve_video_path(tmp_path / "data", str(tmp_path / "data2" / "v.mp4"))


def test_resolve_rejects_symlink_escape(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"x")
    os.symlink(outside / "secret.mp4", root / "link.mp4")
    os.symlink(outside, root / "linkdir")
    os.symlink(root / "real.mp4", root / "inner_link.mp4")
    with pytest.raises(PathOutsideRoot):
        resolve_video_path(root, "link.mp4")
    with pytest.raises(PathOutsideRoot):
        resolve_video_path(root, "linkdir/secret.mp4")
    assert resolve_video_path(root, "inner_link.mp4") == root.resolve() / "real.mp4"


def test_path_outside_root_is_value_error() -> None:
    assert issubclass(PathOutsideRoot, ValueError)


# --------------------------------------------------------------------------------------------- sampling


def qwen_vl_utils_nframes(total: int, native_fps: float, fps: float, min_frames: int, max_frames: int) -> int:
    """qwen-vl-utils' smart_nframes, written out independently."""
    min_f = math.ceil(min_frames / 2) * 2
    max_f = math.floor(max_frames / 2) * 2
    n = total / native_fps * fps
    n = min(min(max(n, min_f), max_f), total)
    return math.floor(n / 2) * 2


@pytest.mark.parametrize(
    ("total", "native_fps", "fps", "min_frames", "max_frames", "expected_n"),
    [
        (250, 25.0, 1.0, 4, 40, 10),  # 10 s at 1 fps
        (250, 25.0, 2.0, 4, 40, 20),
        (2500, 25.0, 1.0, 4, 40, 40),  # 100 s, capped by max_frames
        (2500, 25.0, 1.0, 4, 48, 48),
        (50, 25.0, 1.0, 4, 40, 4),  # 2 s, raised to min_frames
        (132, 25.0, 1.0, 4, 40, 4),  # 5.28 s floors to 4
        (175, 25.0, 1.0, 4, 40, 6),  # 7 s floors to 6
        (300, 25.0, 1.0, 5, 40, 12),  # odd min_frames rounds up (irrelevant here)
        (50, 25.0, 1.0, 5, 40, 6),  # odd min_frames rounds up to 6
        (2500, 25.0, 1.0, 4, 41, 40),  # odd max_frames rounds down
        (120, 30000 / 1001, 1.0, 4, 40, 4),
        (1800, 30000 / 1001, 0.5, 4, 40, 30),  # 60.06 s at 0.5 fps
    ],
)
def test_sample_frame_indices_counts(
    total: int, native_fps: float, fps: float, min_frames: int, max_frames: int, expected_n: int
) -> None:
    cfg = SamplingConfig(fps=fps, min_frames=min_frames, max_frames=max_frames)
    idx = sample_frame_indices(total, native_fps, cfg)
    assert len(idx) == expected_n == qwen_vl_utils_nframes(total, native_fps, fps, min_frames, max_frames)
    np.testing.assert_array_equal(idx, np.linspace(0, total - 1, expected_n).round().astype(np.int64))
    assert idx[0] == 0 and idx[-1] == total - 1
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize(
    ("total", "expected"),
    [(1, [0, 0]), (2, [0, 1]), (3, [0, 1, 2, 2]), (5, [0, 1, 2, 3, 4, 4])],
)
def test_sample_frame_indices_short_videos_pad_last_frame(total: int, expected: list[int]) -> None:
    # 1 fps native with min_frames 8: more frames wanted than exist, so all are kept and padded to even
    cfg = SamplingConfig(fps=1.0, min_frames=8, max_frames=40)
    assert sample_frame_indices(total, 1.0, cfg).tolist() == expected


def test_sample_frame_indices_rejects_empty() -> None:
    with pytest.raises(VideoError):
        sample_frame_indices(0, 25.0, SamplingConfig())
    with pytest.raises(VideoError):
        sample_frame_indices(10, 0.0, SamplingConfig())


def test_sampling_config_validates() -> None:
    with pytest.raises(ValueError):
        SamplingConfig(fps=0)
    with pytest.raises(ValueError):
        SamplingConfig(min_frames=8, max_frames=4)
    with pytest.raises(ValueError):
        SamplingConfig(min_pixels=10, max_pixels=5)


# ---------------------------------------------------------------------------------------- example files


def test_examples_are_small_and_probe() -> None:
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 1_500_000
    for name in FILES:
        meta = probe_video(EXAMPLES / name)
        assert meta.width <= 320 and meta.duration <= 6.0 + 1e-6
        assert meta.num_frames > 0 and meta.fps > 0
        assert meta.backend == "decord"
        assert replace(probe_video(EXAMPLES / name, backend="pyav"), backend="decord") == meta


def test_probe_known_values() -> None:
    meta = probe_video(EXAMPLES / "bikes.mp4")
    assert (meta.num_frames, meta.fps, meta.width, meta.height) == (150, 25.0, 320, 136)
    assert meta.duration == pytest.approx(6.0)
    meta = probe_video(EXAMPLES / "carphone.mp4", backend="pyav")
    assert meta.fps == pytest.approx(30000 / 1001)
    assert (meta.num_frames, meta.width, meta.height, meta.backend) == (120, 176, 144, "pyav")


@pytest.mark.parametrize(("fps", "max_frames", "n"), [(1.0, 40, 6), (2.0, 40, 12), (4.0, 16, 16)])
def test_load_video_sampling_and_timestamps(fps: float, max_frames: int, n: int) -> None:
    cfg = SamplingConfig(fps=fps, max_frames=max_frames)
    clip = load_video(EXAMPLES / "bikes.mp4", cfg)
    assert clip.backend == "decord"
    assert clip.frames.dtype == np.uint8 and clip.frames.shape[0] == n and clip.frames.shape[-1] == 3
    t, h, w, _ = clip.frames.shape
    assert h % 28 == 0 and w % 28 == 0 and h * w <= cfg.max_pixels
    assert (h, w) == smart_resize(136, 320, 28, cfg.min_pixels, cfg.max_pixels)
    expected_idx = np.linspace(0, 149, n).round()
    np.testing.assert_allclose(clip.timestamps, expected_idx / 25.0)
    assert clip.timestamps.dtype == np.float64
    assert clip.native_fps == 25.0
    assert clip.sample_fps == pytest.approx(n / 6.0)
    assert clip.source == str(EXAMPLES / "bikes.mp4")


def test_load_video_respects_pixel_budget() -> None:
    cfg = SamplingConfig(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)
    clip = load_video(EXAMPLES / "carphone.mp4", cfg)  # 176x144 is scaled up to reach min_pixels
    _, h, w, _ = clip.frames.shape
    assert (h, w) == smart_resize(144, 176, 28, cfg.min_pixels, cfg.max_pixels)
    assert cfg.min_pixels <= h * w <= cfg.max_pixels


@pytest.mark.parametrize("name", FILES)
def test_decord_and_pyav_agree(name: str) -> None:
    cfg = SamplingConfig(fps=2.0, max_frames=16)
    a = load_video(EXAMPLES / name, cfg, backend="decord")
    b = load_video(EXAMPLES / name, cfg, backend="pyav")
    assert (a.backend, b.backend) == ("decord", "pyav")
    assert a.frames.shape == b.frames.shape
    np.testing.assert_allclose(a.timestamps, b.timestamps)
    assert a.native_fps == pytest.approx(b.native_fps)
    diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16))
    assert diff.mean() < 1.0, f"mean abs pixel difference {diff.mean():.3f}"


def test_auto_backend_falls_back_to_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    path = EXAMPLES / "carphone.mp4"

    def broken_decord(p: Path, cfg: SamplingConfig) -> None:
        raise VideoError("decord exploded")

    monkeypatch.setattr(video, "_decode_decord", broken_decord)
    assert load_video(path).backend == "pyav"
    with pytest.raises(VideoError, match="decord exploded"):
        load_video(path, backend="decord")

    monkeypatch.setattr(video, "_decord_available", lambda: False)
    assert load_video(path).backend == "pyav"
    assert probe_video(path).backend == "pyav"
    with pytest.raises(VideoError, match="not installed"):
        load_video(path, backend="decord")


def test_unknown_backend_rejected() -> None:
    with pytest.raises(ValueError, match="backend"):
        load_video(EXAMPLES / "carphone.mp4", backend="opencv")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- frames folders


def test_frames_folder() -> None:
    meta = probe_video(FRAMES_DIR, frames_folder_fps=2.0)
    assert (meta.num_frames, meta.fps, meta.duration, meta.backend) == (10, 2.0, 5.0, "frames")
    assert (meta.width, meta.height) == (176, 144)

    cfg = SamplingConfig(fps=1.0, frames_folder_fps=2.0)  # 5 s -> 4 frames
    clip = load_video(FRAMES_DIR, cfg)
    assert clip.backend == "frames" and clip.native_fps == 2.0
    idx = np.linspace(0, 9, 4).round()
    np.testing.assert_allclose(clip.timestamps, idx / 2.0)
    files = sorted(FRAMES_DIR.glob("*.jpg"))
    h, w = clip.frames.shape[1:3]
    for k, i in enumerate(idx.astype(int)):
        ref = np.asarray(Image.open(files[i]).convert("RGB").resize((w, h), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(clip.frames[k], ref)


def test_frames_folder_natural_order_and_filtering(tmp_path: Path) -> None:
    for i, value in [(2, 20), (10, 100), (1, 10)]:
        Image.fromarray(np.full((56, 56, 3), value, np.uint8)).save(tmp_path / f"f_{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    clip = load_video(tmp_path, SamplingConfig(fps=1.0, min_frames=2, frames_folder_fps=1.0))
    # 3 frames at 1 fps: 3 s -> 2 frames, indices 0 and 2 in natural order (f_1, f_10)
    assert clip.frames[:, 0, 0, 0].tolist() == [10, 100]


def test_frames_folder_empty_or_bad(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no image files"):
        probe_video(tmp_path)
    with pytest.raises(VideoError, match="no image files"):
        load_video(tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VideoError, match="cannot read image"):
        load_video(tmp_path)


# ----------------------------------------------------------------------------------------- bad files


def _probe_then_load(path: Path, backend: str) -> None:
    probe_video(path, backend=backend)  # type: ignore[arg-type]
    load_video(path, backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_mp4_raises(tmp_path: Path, backend: str, keep: float) -> None:
    data = (EXAMPLES / "bikes.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VideoError):
        _probe_then_load(path, backend)


def _faststart_copy(src: Path, dst: Path) -> None:
    """Remux with the moov index first, so a cut file still has a complete index."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_truncated_faststart_mp4_raises(tmp_path: Path, backend: str) -> None:
    full = tmp_path / "fs.mp4"
    _faststart_copy(EXAMPLES / "bikes.mp4", full)
    assert full.read_bytes()[36:40] == b"moov"
    load_video(full, backend=backend)  # type: ignore[arg-type]  # the intact remux loads
    data = full.read_bytes()
    for keep in (0.3, 0.95):
        cut = tmp_path / f"cut{keep}.mp4"
        cut.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(VideoError):
            _probe_then_load(cut, backend)


@pytest.mark.parametrize(("extra", "ok"), [(1, True), (2, True), (10, False)])
def test_pyav_header_overcount(monkeypatch: pytest.MonkeyPatch, extra: int, ok: bool) -> None:
    """A header a frame or two too high is tolerated (resampled); a large shortfall means truncation."""
    real_header = video._pyav_header

    def inflated(path: Path) -> tuple[int, float, int, int]:
        n, fps, w, h = real_header(path)
        return n + extra, fps, w, h

    monkeypatch.setattr(video, "_pyav_header", inflated)
    if ok:
        clip = load_video(EXAMPLES / "bikes.mp4", backend="pyav")
        assert clip.timestamps[-1] == pytest.approx(149 / 25.0)
    else:
        with pytest.raises(VideoError, match="truncated"):
            load_video(EXAMPLES / "bikes.mp4", backend="pyav")


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_empty_missing_and_junk_files_raise(tmp_path: Path, backend: str) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        probe_video(empty, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(VideoError, match="empty"):
        load_video(empty, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(VideoError, match="no such file"):
        load_video(tmp_path / "missing.mp4", backend=backend)  # type: ignore[arg-type]
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"definitely not a video " * 64)
    with pytest.raises(VideoError):
        _probe_then_load(junk, backend)


# ------------------------------------------------------------------------------------ Qwen2-VL pixels


def test_smart_resize_matches_transformers() -> None:
    sizes = [
        1,
        7,
        14,
        27,
        28,
        29,
        41,
        42,
        55,
        56,
        70,
        99,
        144,
        176,
        180,
        240,
        320,
        360,
        480,
        720,
        1080,
        1920,
        4000,
    ]
    budgets = [(56 * 56, 14 * 14 * 4 * 1280), (4 * 28 * 28, 360 * 420), (128 * 28 * 28, 768 * 28 * 28)]
    checked = 0
    for h in sizes:
        for w in sizes:
            for lo, hi in budgets:
                try:
                    expected = hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                except ValueError:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(h, w, 28, lo, hi)
                    continue
                assert smart_resize(h, w, 28, lo, hi) == expected, (h, w, lo, hi)
                checked += 1
    assert checked > 1000
    assert smart_resize(720, 1280) == hf_smart_resize(720, 1280)  # same defaults
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def _image_processor(cfg: SamplingConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})


def test_qwen_video_inputs_match_image_processor() -> None:
    """Each temporal slot of ours equals transformers' PIL processor on that frame (which it duplicates)."""
    cfg = SamplingConfig(fps=1.0)
    clip = load_video(EXAMPLES / "bikes.mp4", cfg)
    a, b = clip.frames[0], clip.frames[3]
    proc = _image_processor(cfg)
    ref_a = proc(images=[Image.fromarray(a)], return_tensors="pt")
    ref_b = proc(images=[Image.fromarray(b)], return_tensors="pt")

    ours = qwen_video_inputs(VideoClip(np.stack([a, a, b, b]), np.array([0.0, 0.0, 1.0, 1.0]), 25.0, "x"))
    _, gh, gw = ref_a["image_grid_thw"][0].tolist()
    assert ours.video_grid_thw.tolist() == [[2, gh, gw]]
    assert ours.video_grid_thw.dtype == torch.long
    assert ours.pixel_values_videos.dtype == torch.float32
    assert ours.pixel_values_videos.shape == (2 * gh * gw, 3 * 2 * 14 * 14)
    torch.testing.assert_close(ours.pixel_values_videos[: gh * gw], ref_a["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pixel_values_videos[gh * gw :], ref_b["pixel_values"], atol=1e-5, rtol=0)
    assert ours.num_video_tokens == 2 * gh * gw // 4


def test_qwen_video_inputs_resizing_matches_image_processor() -> None:
    """Our resize (smart_resize + PIL bicubic) equals the processor's, starting from the raw JPEG."""
    cfg = SamplingConfig(fps=1.0, frames_folder_fps=1.0, min_pixels=16 * 28 * 28, max_pixels=128 * 28 * 28)
    clip = load_video(FRAMES_DIR, cfg)
    first = Image.open(sorted(FRAMES_DIR.glob("*.jpg"))[0]).convert("RGB")
    ref = _image_processor(cfg)(images=[first], return_tensors="pt")
    single = VideoClip(np.stack([clip.frames[0]] * 2), np.zeros(2), 1.0, "x")
    ours = qwen_video_inputs(single)
    assert ours.video_grid_thw.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values_videos, ref["pixel_values"], atol=1e-5, rtol=0)


def test_qwen_video_inputs_temporal_layout() -> None:
    """Rows are (C, t, 14, 14): time slot 0 holds the first frame of the pair, slot 1 the second."""
    clip = load_video(EXAMPLES / "carphone.mp4", SamplingConfig(fps=1.0))
    a, b = clip.frames[0], clip.frames[2]
    both = qwen_video_inputs(VideoClip(np.stack([a, b]), np.array([0.0, 1.0]), 1.0, "x")).pixel_values_videos
    only_a = qwen_video_inputs(VideoClip(np.stack([a, a]), np.zeros(2), 1.0, "x")).pixel_values_videos
    only_b = qwen_video_inputs(VideoClip(np.stack([b, b]), np.zeros(2), 1.0, "x")).pixel_values_videos
    view = lambda x: x.view(-1, 3, 2, 14, 14)  # noqa: E731  # as Qwen2.5-VL's PatchEmbed reads a row
    torch.testing.assert_close(view(both)[:, :, 0], view(only_a)[:, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(view(both)[:, :, 1], view(only_b)[:, :, 1], atol=0, rtol=0)
    assert not torch.equal(view(both)[:, :, 0], view(both)[:, :, 1])


def test_qwen_video_inputs_metadata_and_padding() -> None:
    clip = load_video(EXAMPLES / "bikes.mp4", SamplingConfig(fps=2.0, max_frames=16))  # 12 frames
    out = qwen_video_inputs(clip)
    t, h, w = out.video_grid_thw[0].tolist()
    assert (t, h, w) == (6, clip.frames.shape[1] // 14, clip.frames.shape[2] // 14)
    assert out.num_video_tokens == t * h * w // 4
    assert out.second_per_grid_t == pytest.approx(2 / 2.0)  # 12 frames over 6 s

    odd = VideoClip(clip.frames[:3], clip.timestamps[:3], clip.native_fps, clip.source, sample_fps=2.0)
    padded = VideoClip(clip.frames[[0, 1, 2, 2]], clip.timestamps[[0, 1, 2, 2]], 25.0, "x", sample_fps=2.0)
    torch.testing.assert_close(
        qwen_video_inputs(odd).pixel_values_videos, qwen_video_inputs(padded).pixel_values_videos
    )
    # without sample_fps, it is estimated from the timestamps
    no_fps = VideoClip(clip.frames[:4], np.array([0.0, 0.5, 1.0, 1.5]), 25.0, "x")
    assert qwen_video_inputs(no_fps).second_per_grid_t == pytest.approx(1.0)


def test_qwen_video_inputs_rejects_unresized_frames() -> None:
    with pytest.raises(ValueError, match="multiple of 28"):
        qwen_video_inputs(VideoClip(np.zeros((2, 30, 56, 3), np.uint8), np.zeros(2), 1.0, "x"))


def test_qwen_video_inputs_feed_a_tiny_qwen25_vision_tower() -> None:
    """A random-weight Qwen2.5-VL vision tower takes our inputs and emits one embedding per video token."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from tests._tiny_vl import tiny_config

    torch.manual_seed(0)
    config = tiny_config().vision_config
    tower = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    inputs = qwen_video_inputs(load_video(EXAMPLES / "bikes.mp4"))
    with torch.no_grad():
        out = tower(inputs.pixel_values_videos, grid_thw=inputs.video_grid_thw)
    assert out.pooler_output.shape == (inputs.num_video_tokens, config.out_hidden_size)
    assert torch.isfinite(out.pooler_output).all()
