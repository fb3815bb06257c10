"""Needle scenes: objects (colour, shape, cell, time) on a drifting grey texture, rendered on the LM token grid.

Geometry: a frame is `grid_rows x grid_cols` cells of 28 x 28 px and a video is `steps` pairs of frames, so cell
(r, c) of frames 2t and 2t+1 is exactly LM visual token t * cells + r * grid_cols + c (Qwen2.5-VL: 14-px patches,
2x2 merge, temporal patch 2; tokens are emitted t-major, then row, then column). An object is drawn inside one cell
for one or two time steps, so the visual tokens that hold it are known by construction (`Obj.tokens`).

Every object of a video has its own colour (so a colour names exactly one object, and no object is rarer than
another by colour), while shapes, places (quadrants) and times (quarters of the video) are shared: each value is
spread over the objects in turn, so every option of a question is shown by some distractor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from qtsplus.needle.config import CELL, FRAMES_PER_STEP, PALETTE, PLACES, QUARTERS, SHAPES, NeedleConfig


@dataclass(frozen=True)
class Obj:
    """One object: what it looks like, where (cell) and when (time steps [start, start + steps))."""

    colour: str
    shape: str
    row: int
    col: int
    start: int
    steps: int
    dx: int  # offset of the drawing inside its cell (pixels)
    dy: int

    def tokens(self, cfg: NeedleConfig) -> list[int]:
        """The LM visual-token indices that hold this object."""
        cell = self.row * cfg.grid_cols + self.col
        return [(self.start + k) * cfg.cells + cell for k in range(self.steps)]

    def place(self, cfg: NeedleConfig) -> str:
        """Quadrant of the frame."""
        bottom = self.row >= cfg.grid_rows // 2
        right = self.col >= cfg.grid_cols // 2
        return PLACES[2 * bottom + right]

    def quarter(self, cfg: NeedleConfig) -> str:
        """Quarter of the video in which it first appears."""
        return QUARTERS[self.start * 4 // cfg.steps]


@dataclass(frozen=True)
class Scene:
    video_id: str
    objects: tuple[Obj, ...]
    texture_seed: int
    velocity: tuple[float, float]  # texture drift (pixels per frame), y then x

    def to_dict(self) -> dict:
        return {"video_id": self.video_id, "objects": [asdict(o) for o in self.objects],
                "texture_seed": self.texture_seed, "velocity": list(self.velocity)}


def _balanced(rng: np.random.Generator, values: int, n: int) -> list[int]:
    """n draws of range(values) that use every value in turn (a shuffled round-robin), so each value occurs
    n // values or n // values + 1 times."""
    out: list[int] = []
    while len(out) < n:
        out += rng.permutation(values).tolist()
    return rng.permutation(out[:n]).tolist()


def sample_scene(cfg: NeedleConfig, video_id: str, rng: np.random.Generator, objects: int | None = None) -> Scene:
    """`objects` (default cfg.objects) objects with distinct colours and balanced shapes, quadrants and start
    quarters, in free cells."""
    n = cfg.objects if objects is None else objects
    colours = rng.choice(len(cfg.colours), size=n, replace=False).tolist()
    shapes = _balanced(rng, len(SHAPES), n)
    quadrants = _balanced(rng, 4, n)
    quarters = _balanced(rng, 4, n)
    per_quarter = cfg.steps // 4
    half_r, half_c = cfg.grid_rows // 2, cfg.grid_cols // 2
    busy = np.zeros((cfg.steps, cfg.grid_rows, cfg.grid_cols), dtype=bool)
    objects = []
    for i in range(n):
        for _ in range(1000):
            steps = int(rng.integers(1, cfg.max_steps_on + 1))
            start = quarters[i] * per_quarter + int(rng.integers(0, per_quarter))
            steps = min(steps, cfg.steps - start)
            qr, qc = divmod(quadrants[i], 2)
            row = qr * half_r + int(rng.integers(0, half_r))
            col = qc * half_c + int(rng.integers(0, half_c))
            if not busy[start : start + steps, row, col].any():
                break
        else:
            raise RuntimeError(f"{video_id}: no free cell for object {i}; fewer objects or a larger grid")
        busy[start : start + steps, row, col] = True
        slack = CELL - cfg.object_size
        dy, dx = (int(np.clip(slack // 2 + v, 0, slack)) for v in rng.integers(-cfg.jitter, cfg.jitter + 1, size=2))
        objects.append(Obj(cfg.colours[colours[i]], SHAPES[shapes[i]], row, col, start, steps, dx, dy))
    angle = rng.uniform(0, 2 * np.pi)
    velocity = (cfg.background_speed * float(np.sin(angle)), cfg.background_speed * float(np.cos(angle)))
    return Scene(video_id, tuple(objects), int(rng.integers(0, 2**31 - 1)), velocity)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool silhouette of a shape."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - c
    h = size / 2
    if shape == "square":
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "circle":
        return x**2 + y**2 <= h**2
    if shape == "triangle":  # apex up
        return (y >= -h) & (y <= h) & (np.abs(x) <= (y + h) / 2)
    if shape == "cross":
        bar = h / 3
        return ((np.abs(x) <= bar) & (np.abs(y) <= h)) | ((np.abs(y) <= bar) & (np.abs(x) <= h))
    raise ValueError(f"unknown shape {shape!r}")


def background(cfg: NeedleConfig, scene: Scene) -> np.ndarray:
    """uint8 [frames, H, W] grey texture (smooth noise around grey 127) drifting by `scene.velocity` per frame."""
    rng = np.random.default_rng(scene.texture_seed)
    scale = cfg.texture_scale
    h, w = 2 * cfg.height, 2 * cfg.width  # a periodic tile twice the frame, rolled frame by frame
    coarse = rng.standard_normal((-(-h // scale), -(-w // scale)))
    tile = np.kron(coarse, np.ones((scale, scale)))[:h, :w]
    for axis in (0, 1):  # a box blur as wide as a blob turns the blocks into smooth blobs (wrapping: the tile is periodic)
        tile = _box_blur(tile, scale, axis)
    tile = tile / (np.abs(tile).max() + 1e-9)
    frames = np.empty((cfg.frames, cfg.height, cfg.width), dtype=np.uint8)
    for f in range(cfg.frames):
        oy, ox = (round(v * f) for v in scene.velocity)
        rolled = np.roll(tile, (oy, ox), axis=(0, 1))[: cfg.height, : cfg.width]
        frames[f] = np.clip(127 + cfg.background_contrast * rolled, 0, 255).astype(np.uint8)
    return frames


def _box_blur(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Mean over a window of `width` samples around each one, wrapping around `axis` (a running sum)."""
    after = width // 2
    before = width - 1 - after
    n = a.shape[axis]
    padded = np.concatenate([np.take(a, range(n - before, n), axis=axis), a, np.take(a, range(after), axis=axis)],
                            axis=axis)
    sums = np.cumsum(padded, axis=axis)
    zero = np.zeros_like(np.take(sums, [0], axis=axis))
    sums = np.concatenate([zero, sums], axis=axis)
    return (np.take(sums, range(width, width + n), axis=axis) - np.take(sums, range(n), axis=axis)) / width


def render(cfg: NeedleConfig, scene: Scene) -> np.ndarray:
    """uint8 [frames, H, W, 3]: the texture, and each object in its cell during its time steps."""
    frames = np.repeat(background(cfg, scene)[..., None], 3, axis=-1)
    size = cfg.object_size
    for o in scene.objects:
        mask = shape_mask(o.shape, size)
        y0, x0 = o.row * CELL + o.dy, o.col * CELL + o.dx
        first, last = o.start * FRAMES_PER_STEP, (o.start + o.steps) * FRAMES_PER_STEP
        patch = frames[first:last, y0 : y0 + size, x0 : x0 + size]
        patch[:, mask] = PALETTE[o.colour]
    return frames
