"""Questions about a needle scene: each names objects by their colour (unique in the video) and asks about another
attribute; four options, balanced keys, a short free-form answer, and the target's token span.

Kinds (NeedleConfig.kinds weights them):
- shape: "What shape is the red object?" -> the four shapes (each is on some object of the video);
- place: "Where does the red object appear?" -> the four quadrants;
- time:  "When does the red object first appear?" -> the four quarters of the video;
- order: "Which of these appears first?" -> four objects of the video, named by colour (they first appear in four
  different time steps); the target tokens are all four objects'.

Options come in a fixed order per kind (shapes, quadrants, quarters as listed in qtsplus.needle.config; order: the
objects in the order the question draws them), unless `shuffle_options`: the key is then uniform because the asked
attribute is (every value is spread evenly over the objects, and the named object is drawn uniformly), and the host
is spared reading the option lines to find the key. With `shuffle_options` the key is drawn uniformly instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qtsplus.needle.config import KINDS, PLACES, QUARTERS, SHAPES, NeedleConfig
from qtsplus.needle.scene import Obj, Scene
from schemas import OPTION_KEYS

# the project's question types (schemas.QUESTION_TYPES) of each kind, and a difficulty
QUESTION_TYPE = {"shape": "attribute_color_material_shape", "place": "setting_location", "time": "temporal_order",
                 "order": "temporal_order"}
DIFFICULTY = {"shape": "easy", "place": "medium", "time": "medium", "order": "hard"}


@dataclass(frozen=True)
class NeedleQuestion:
    kind: str
    question: str
    options: dict[str, str]  # A..D
    answer: str  # the key
    free_form: str  # the short free-form answer
    targets: tuple[int, ...]  # indices into scene.objects the question is about
    target_tokens: list[int]  # visual-token indices holding them, ascending
    evidence: str


def _name(o: Obj) -> str:
    return f"the {o.colour} object"


def _options(values: list[str], correct: str, shuffle: bool, rng: np.random.Generator) -> tuple[dict[str, str], str]:
    """Four options in the given order (or shuffled), and the key of the correct one."""
    if shuffle:
        values = [values[i] for i in rng.permutation(len(values))]
    return dict(zip(OPTION_KEYS, values, strict=True)), OPTION_KEYS[values.index(correct)]


def _ask(cfg: NeedleConfig, scene: Scene, kind: str, targets: tuple[int, ...],
         rng: np.random.Generator) -> NeedleQuestion:
    o = scene.objects[targets[0]]
    name = _name(o)
    if kind == "shape":
        question, correct, values = f"What shape is {name}?", f"a {o.shape}", [f"a {s}" for s in SHAPES]
    elif kind == "place":
        question, correct = f"Where does {name} appear?", f"in the {o.place(cfg)}"
        values = [f"in the {p}" for p in PLACES]
    elif kind == "time":
        quarter = o.quarter(cfg)
        question = f"When does {name} first appear?"
        correct, values = f"in the {quarter} quarter", [f"in the {q} quarter" for q in QUARTERS]
    elif kind == "order":
        named = [scene.objects[i] for i in targets]
        first = min(named, key=lambda p: p.start)
        question, correct, values = "Which of these appears first?", _name(first), [_name(p) for p in named]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    options, answer = _options(values, correct, cfg.shuffle_options, rng)
    free = correct[0].upper() + correct[1:] + "."  # short: the answer itself ("A circle.", "In the top left.")
    tokens = sorted(t for i in targets for t in scene.objects[i].tokens(cfg))
    evidence = "; ".join(f"{p.colour} {p.shape} at cell ({p.row}, {p.col}), time steps {p.start}.."
                         f"{p.start + p.steps - 1}" for p in (scene.objects[i] for i in targets))
    return NeedleQuestion(kind, question, options, answer, free, targets, tokens, evidence)


def _order_targets(scene: Scene, rng: np.random.Generator) -> tuple[int, ...] | None:
    """Four objects that first appear in four different time steps, in a random order; None if there are none."""
    by_start: dict[int, list[int]] = {}
    for i, o in enumerate(scene.objects):
        by_start.setdefault(o.start, []).append(i)
    if len(by_start) < len(OPTION_KEYS):
        return None
    starts = rng.choice(sorted(by_start), size=len(OPTION_KEYS), replace=False)
    return tuple(int(rng.choice(by_start[int(s)])) for s in starts)


def ask(cfg: NeedleConfig, scene: Scene, rng: np.random.Generator) -> list[NeedleQuestion]:
    """`questions_per_video` questions (fewer in a scene with fewer objects), kinds drawn by weight; the
    single-object kinds each ask about an object not asked about before in the video. A scene whose objects start in
    fewer than four time steps (only small training scenes) gets a single-object kind instead of `order`."""
    kinds = [k for k in KINDS if cfg.kinds.get(k, 0) > 0]
    weights = np.array([cfg.kinds[k] for k in kinds], dtype=np.float64)
    single = [k for k in kinds if k != "order"] or ["shape"]
    fresh = rng.permutation(len(scene.objects)).tolist()
    out = []
    for _ in range(min(cfg.questions_per_video, len(scene.objects))):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        targets = _order_targets(scene, rng) if kind == "order" else None
        if targets is None:
            kind = kind if kind != "order" else single[int(rng.integers(len(single)))]
            targets = (fresh.pop(),)
        out.append(_ask(cfg, scene, kind, targets, rng))
    return out


def caption(cfg: NeedleConfig, scene: Scene) -> str:
    """A plain description of the scene, in order of appearance (the captions stage's text)."""
    seconds = cfg.frames / cfg.fps / cfg.steps
    parts = [f"a {o.colour} {o.shape} in the {o.place(cfg)} at {o.start * seconds:.1f} s"
             for o in sorted(scene.objects, key=lambda o: (o.start, o.row, o.col))]
    return "A grey texture drifts across the frame while objects appear one after another: " + ", ".join(parts) + "."
