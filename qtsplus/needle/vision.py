"""The needle host: the tiny Qwen2.5-VL whose vision tower is first taught to see the needle scenes.

A real Qwen2.5-VL's vision tower arrives pretrained; the tiny one is random. Its features do carry colour and shape,
but entangled with the texture, and a tiny LM trained from scratch on the questions stays at chance on them
(docs/needle.md, "How the host learns"). So, as a VLM's vision encoder is pretrained before its LM learns to answer,
the tower (patch embedding and merger) first learns to tell, for every visual token of the training videos, the colour
and the shape of the object in it, or that it holds none: a linear head on its output, cross-entropy, labels known by
construction (`Obj.tokens`). The head is then dropped and the tower saved with the rest of the host, unchanged. No
held-out video, no question and no answer is seen here: places, times and the binding of a colour named in a question
to a token are left for the LM to learn (`train-selector --variant base`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from qtsplus.fingerprint import canonical, code_fingerprint, fingerprint
from qtsplus.needle.config import SHAPES, NeedleConfig
from qtsplus.needle.scene import render
from qtsplus.needle.writer import train_scene
from qtsplus.tiny import resolve_model
from qtsplus.video import VideoClip, qwen_video_inputs

RECORD = "needle_host.json"


class VisionTeaching(BaseModel):
    """How the host's vision tower is taught (one typed model; part of the host's cache key)."""

    host: str = Field("tiny/qwen2.5-vl-needle", description="the untrained host: a tiny model name or a folder")
    steps: int = Field(300, ge=0, description="optimiser steps (0: the host as it is, vision untaught)")
    videos: int = Field(200, ge=1, description="training videos used (the first ones of the train split)")
    batch_videos: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


def depends_on(data: NeedleConfig, teaching: VisionTeaching) -> dict:
    """What the taught host is a function of: the scenes (the data config less its folder), the teaching config, the
    untrained host's revision and the code."""
    _, revision = resolve_model(teaching.host, None)
    return {"scenes": canonical(data.model_dump(exclude={"out"})), "teaching": teaching.model_dump(),
            "host_revision": revision, "code_version": code_fingerprint(teach_vision)}


def token_labels(cfg: NeedleConfig, scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Per visual token: colour index (len(colours) = no object) and shape index (len(SHAPES) = no object)."""
    colour = torch.full((cfg.tokens,), len(cfg.colours))
    shape = torch.full((cfg.tokens,), len(SHAPES))
    for o in scene.objects:
        for t in o.tokens(cfg):
            colour[t], shape[t] = cfg.colours.index(o.colour), SHAPES.index(o.shape)
    return colour, shape


def teach_vision(data: NeedleConfig, teaching: VisionTeaching, out: Path, progress: bool = True) -> Path:
    """Write the host with its taught vision tower to `out` (a plain Qwen2.5-VL folder with tokenizer and processor
    files, and `needle_host.json`: the teaching record with the final per-token accuracies). Deterministic given
    its inputs (seeded; one thread's float order aside)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    source, _ = resolve_model(teaching.host, None)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    tower = model.model.visual
    n_colours, n_shapes = len(data.colours) + 1, len(SHAPES) + 1
    examples = []
    for i in range(min(teaching.videos, data.train_videos)):
        scene = train_scene(data, i)
        clip = VideoClip(frames=render(data, scene), timestamps=np.arange(data.frames) / data.fps,
                         native_fps=data.fps, source=scene.video_id, sample_fps=data.fps)
        examples.append((qwen_video_inputs(clip), *token_labels(data, scene)))
    accuracy = {"colour": float("nan"), "shape": float("nan")}
    if teaching.steps:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(teaching.seed)
            head = torch.nn.Linear(model.config.vision_config.out_hidden_size, n_colours + n_shapes)
            rng = np.random.default_rng(teaching.seed)
            tower.train().requires_grad_(True)
            opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=teaching.lr, weight_decay=0.0)
            bar = tqdm(total=teaching.steps, desc="teach vision", unit="step", disable=not progress, leave=False)
            for _ in range(teaching.steps):
                batch = [examples[j] for j in rng.choice(len(examples), min(teaching.batch_videos, len(examples)),
                                                         replace=False)]
                pixels = torch.cat([v.pixel_values_videos for v, _, _ in batch])
                grid = torch.cat([v.video_grid_thw for v, _, _ in batch])
                logits = head(torch.cat(list(model.model.get_video_features(pixels, grid).pooler_output)))
                colour = torch.cat([c for _, c, _ in batch])
                shape = torch.cat([s for _, _, s in batch])
                loss = (torch.nn.functional.cross_entropy(logits[:, :n_colours], colour)
                        + torch.nn.functional.cross_entropy(logits[:, n_colours:], shape))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                on_object = colour < n_colours - 1
                accuracy = {"colour": _accuracy(logits[on_object, :n_colours], colour[on_object]),
                            "shape": _accuracy(logits[on_object, n_colours:], shape[on_object]), "loss": loss.item()}
                bar.update(1)
            bar.close()
    tower.eval().requires_grad_(False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    for extra in Path(source).glob("*preprocessor_config.json"):
        shutil.copy(extra, tmp / extra.name)
    record = {"teaching": teaching.model_dump(), "last_batch_accuracy_on_object_tokens": accuracy,
              "fingerprint": fingerprint(depends_on(data, teaching))}
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")
