"""Training examples streamed from the dataset's Parquet shards, mixed, tokenized and batched (paper Eq. 2-4).

- MCQ examples come from VSCQ2 `train_kept`: the training-time MCQ prompt, target = the option letter.
- VQA examples come from QTS-VQA `train`: the free-form prompt, target = the teacher's answer.
- Videos: decoded with the run's `SamplingConfig` and packed as pixels for the vision tower, or, when a feature store
  (qtsplus.features) holds verified features of every video of a micro-batch for this sampling and vision tower, the
  cached features (`video_embeds`) with the same grid, times and tokens: the vision tower then does not run.
Both are mixed in one stream (`mcq_weight` : `vqa_weight` per round), shuffled through a seeded buffer, sharded over
ranks, and repeat epoch after epoch. The stream is a deterministic function of (dataset, config, epoch), so a resumed
run can skip exactly the examples it has already seen. Only the shard being read and the shuffle buffer are in memory.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qtsplus.engines import Prompt
from qtsplus.engines.chat import encode_prompt
from qtsplus.features.store import FeatureSet, VideoFeatures, video_prompt_ids
from qtsplus.prompts import mcq_user_prompt, vqa_user_prompt
from qtsplus.shards import load_manifest, read_rows
from qtsplus.training.config import TrainConfig
from qtsplus.video import SamplingConfig, load_video, resolve_video_path
from schemas import VQAAnswer, VSCQ2Question

IGNORE = -100


@dataclass(frozen=True)
class TrainExample:
    kind: str  # "mcq" | "vqa"
    question_id: str
    video: str
    prompt: str  # user text (the video goes before it)
    target: str  # the assistant's answer


def mcq_examples(data: Path, split: str = "train_kept") -> Iterator[TrainExample]:
    """VSCQ2 kept questions as MCQ examples (target: the teacher-validated option letter)."""
    files = [f for f in load_manifest(data, "vscq2").files if f.split == split]
    for q in read_rows(data, files, VSCQ2Question):
        yield TrainExample("mcq", q.question_id, q.video, mcq_user_prompt(q.question, q.options.model_dump()), q.answer)


def vqa_examples(data: Path, split: str = "train") -> Iterator[TrainExample]:
    """QTS-VQA answers as generative examples (target: the teacher's free-form answer)."""
    files = [f for f in load_manifest(data, "vqa").files if f.split == split]
    for a in read_rows(data, files, VQAAnswer):
        yield TrainExample("vqa", a.question_id, a.video, vqa_user_prompt(a.question), a.prediction)


def mixed(data: Path, mcq_weight: int, vqa_weight: int) -> Iterator[TrainExample]:
    """One pass over both sources, interleaved mcq_weight : vqa_weight until both are exhausted."""
    sources = [(mcq_examples(data), mcq_weight), (vqa_examples(data), vqa_weight)]
    sources = [(it, w) for it, w in sources if w > 0]
    while sources:
        alive = []
        for it, w in sources:
            chunk = list(itertools.islice(it, w))
            yield from chunk
            if len(chunk) == w:
                alive.append((it, w))
        sources = alive


def shuffled(examples: Iterator[TrainExample], buffer: int, rng: random.Random) -> Iterator[TrainExample]:
    """Streaming shuffle through a buffer of `buffer` examples."""
    pool: list[TrainExample] = []
    for ex in examples:
        pool.append(ex)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def example_stream(cfg: TrainConfig, rank: int = 0, world: int = 1) -> Iterator[tuple[int, TrainExample]]:
    """(epoch, example) forever: each epoch a fresh seeded shuffle; rank r takes every world-th example."""
    data = Path(cfg.data)
    for epoch in itertools.count():
        rng = random.Random(f"{cfg.seed}/{epoch}")
        stream = shuffled(mixed(data, cfg.mcq_weight, cfg.vqa_weight), cfg.shuffle_buffer, rng)
        n = 0
        for i, ex in enumerate(stream):
            if i % world == rank:
                n += 1
                yield epoch, ex
        if n == 0:
            raise ValueError(f"{data}: no training examples for rank {rank} of {world} (VSCQ2 train_kept and VQA train)")


def default_video_root(data: Path) -> Path:
    """The video root recorded in the dataset's captions manifest."""
    return Path(load_manifest(data, "captions").provenance["video_root"])


class Collator:
    """Tokenizes examples exactly as the engines do at inference, appends the answer, masks all but the answer.

    With `features` (a verified feature set), a micro-batch whose videos are all cached gets `video_embeds` (their
    vision-tower output, packed in row order) instead of `pixel_values_videos`; the token ids, labels, grids and times
    are the same. A micro-batch with any uncached video is decoded whole (the model takes one or the other).
    """

    def __init__(self, tokenizer, model_config, video_root: Path, sampling: SamplingConfig,
                 features: FeatureSet | None = None):
        self.tokenizer = tokenizer
        self.config = model_config
        self.video_root = video_root
        self.sampling = sampling
        self.features = features
        self.end_ids = tokenizer.encode("<|im_end|>", add_special_tokens=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def cached(self, ex: TrainExample) -> VideoFeatures | None:
        if self.features is None:
            return None
        return self.features.get(resolve_video_path(self.video_root, ex.video))

    def encode(self, ex: TrainExample, cached: VideoFeatures | None = None) -> dict:
        if cached is not None:
            prompt_ids = video_prompt_ids(self.tokenizer, ex.prompt, self.config.video_token_id, cached.num_tokens)
            video = cached
        else:
            clip = load_video(resolve_video_path(self.video_root, ex.video), self.sampling)
            prompt_ids, video = encode_prompt(self.tokenizer, Prompt(user=ex.prompt, video=clip),
                                              self.config.video_token_id, self.config.vision_config)
        answer_ids = self.tokenizer.encode(ex.target, add_special_tokens=False) + self.end_ids
        return {
            "ids": prompt_ids + answer_ids,
            "labels": [IGNORE] * len(prompt_ids) + answer_ids,
            "video": video,
        }

    def __call__(self, examples: list[TrainExample]) -> dict[str, torch.Tensor]:
        cached = [self.cached(ex) for ex in examples]
        if any(c is None for c in cached):
            cached = [None] * len(examples)
        rows = [self.encode(ex, c) for ex, c in zip(examples, cached, strict=True)]
        length = max(len(r["ids"]) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding, as at inference
            n = len(r["ids"])
            input_ids[i, length - n :] = torch.tensor(r["ids"])
            labels[i, length - n :] = torch.tensor(r["labels"])
            attention_mask[i, length - n :] = 1
        videos = [r["video"] for r in rows]
        if cached[0] is not None:
            pixels = {"video_embeds": torch.cat([v.features for v in videos]),
                      "video_grid_thw": torch.cat([v.grid_thw for v in videos])}
        else:
            pixels = {"pixel_values_videos": torch.cat([v.pixel_values_videos for v in videos]),
                      "video_grid_thw": torch.cat([v.video_grid_thw for v in videos])}
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **pixels,
            "second_per_grid_ts": torch.tensor([v.second_per_grid_t for v in videos]),
        }


def batches(
    cfg: TrainConfig, collator: Collator, rank: int, world: int, skip_batches: int = 0
) -> Iterator[tuple[int, dict[str, torch.Tensor], list[str]]]:
    """(epoch, batch, kinds) forever; the first `skip_batches` micro-batches are skipped without decoding video."""
    stream = example_stream(cfg, rank, world)
    chunks = iter(lambda: list(itertools.islice(stream, cfg.micro_batch_size)), [])
    if cfg.overfit_batches:
        fixed = list(itertools.islice(chunks, cfg.overfit_batches))
        chunks = itertools.cycle(fixed)
    for i, chunk in enumerate(chunks):
        if i < skip_batches:
            continue
        examples = [ex for _, ex in chunk]
        yield chunk[0][0], collator(examples), [ex.kind for ex in examples]
