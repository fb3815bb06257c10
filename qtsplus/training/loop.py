"""The training loop, one process per rank, started by the deepspeed launcher:

    deepspeed [--num_gpus N] --module qtsplus.training.loop --config RUN/train-config.json

It resumes from the newest checkpoint in RUN/checkpoints when there is one (the step counter, optimizer, scheduler,
rho_bar and data position continue), logs one JSON line per step to RUN/metrics.jsonl (rank 0), checkpoints every
`checkpoint_every` steps, and exports RUN/final (a QTSplus checkpoint for `from_pretrained`) at the end.
Loss (paper Eq. 2-5): token cross-entropy on the answer (the option letter for MCQ, the teacher's answer for VQA)
+ lambda_t (rho M)^2/n_max^2 + lambda_m rho M/n_max + lambda_s (rho - rho_bar)^2. With another method
(`TrainConfig.method`): VQToken trains on the cross-entropy alone, FlexSelect-Lite on its Spearman rank loss alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from qtsplus.atomic import write_text_atomic
from qtsplus.features.store import open_feature_set
from qtsplus.selectors.qtsplus.losses import attention_cost, budget_prior, memory_cost
from qtsplus.training.config import TrainConfig
from qtsplus.training.data import Collator, batches, default_video_root
from qtsplus.training.model import build_model, export_final

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """The ZeRO config file with its "auto" entries filled from the training config, plus optimizer and schedule."""
    ds = json.loads(cfg.deepspeed_config_path().read_text())
    auto = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world size
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                    "betas": [0.9, 0.999], "eps": 1e-8}}
    # warmup_steps=0 means none: DeepSpeed needs one warmup step, so start that step at the full rate
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        "total_num_steps": cfg.max_steps, "warmup_num_steps": max(1, cfg.warmup_steps), "warmup_type": "linear",
        "warmup_min_ratio": 1.0 if cfg.warmup_steps == 0 else 0.0, "cos_min_ratio": 0.1}}
    return ds


def newest_checkpoint(run: Path) -> int | None:
    """Step of the newest complete checkpoint (DeepSpeed writes `latest` after the tag's files)."""
    latest = run / CHECKPOINTS / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return int(tag.removeprefix("step-")) if (run / CHECKPOINTS / tag).is_dir() else None


def gate_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The training gate's randomness for one micro-batch: a function of (seed, step, micro, rank), so a resumed run
    draws exactly what an uninterrupted one would have."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines past the checkpoint we resume from (logged after it, before the crash)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _prune_checkpoints(folder: Path, keep: int) -> None:
    tags = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in tags[:-keep]:
        shutil.rmtree(old)


def peak_memory_mib() -> float:
    """Peak memory of this rank so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_metrics(out, model) -> dict[str, float]:
    """Loss terms and the budget statistics of one forward. QTSplus (paper: log r, rho, n): the Eq. 5 terms, rho,
    rho_bar, n. Another method: each auxiliary loss as `<name>_loss`, tokens in and kept, and its numeric
    per-video diagnostics averaged (FlexSelect-Lite: spearman with its teacher; VQToken: num_clusters)."""
    sel = getattr(out, "selection", None)  # absent with selection off (variant base): the base model's output
    lm_loss = getattr(out, "lm_loss", None) if sel is not None else out.loss
    m = {"loss": float(out.loss), "lm_loss": float(lm_loss) if lm_loss is not None else float("nan")}
    if sel is None:
        return m
    M = sel.num_tokens.float()
    m.update(kept_fraction=float((sel.num_kept.float() / M).mean()), tokens_in=float(M.mean()))
    if not model.uses_qtsplus:
        m.update({f"{name}_loss": float(value) for name, value in sel.losses.items()}, n=float(sel.budget.float().mean()))
        for key in sel.extras[0] if sel.extras else ():
            values = [row[key] for row in sel.extras]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                m[key] = float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else math.nan
        return m
    cfg_sel, rho_bar = model.selector.config, model.selector.rho_bar
    rho = sel.rho.detach().float()
    m.update(
        budget_loss=float(sel.loss) if sel.loss is not None else 0.0,
        attention_cost=float(attention_cost(rho, M, cfg_sel.n_max).mean()),
        memory_cost=float(memory_cost(rho, M, cfg_sel.n_max).mean()),
        budget_prior=float(budget_prior(rho, rho_bar.float()).mean()),
        rho=float(rho.mean()),
        n=float(sel.budget.float().mean()),
        rho_bar=float(rho_bar),
    )
    return m


def train(cfg: TrainConfig) -> None:
    import deepspeed

    run = Path(cfg.out)
    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    use_cuda = torch.cuda.is_available()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=deepspeed_config(cfg, bf16=use_cuda))
    start = 0
    if newest_checkpoint(run) is not None:  # restores the schedule's position too
        _, client = engine.load_checkpoint(str(run / CHECKPOINTS))
        start = int(client["step"])
    else:  # DeepSpeed's schedule starts "not started", at lr 0: enter its iteration 0 before the first step
        engine.lr_scheduler.step()
    # cached vision features, if a store holds them for this sampling and this exact tower (in its training dtype)
    trains_vision = cfg.variant == "base" and cfg.train_vision  # then no cache holds what the tower computes
    features = None if trains_vision else open_feature_set(cfg.features, Path(cfg.data), cfg.video,
                                                            engine.module.model.visual)
    metrics = run / METRICS
    if rank == 0:
        _truncate_metrics(metrics, start)
        with metrics.open("a") as f:
            f.write(json.dumps({"event": "start", "resumed_from": start, "world_size": world,
                                "features": str(features.folder) if features is not None else None}) + "\n")

    video_root = Path(cfg.video_root) if cfg.video_root else default_video_root(Path(cfg.data))
    collator = Collator(tokenizer, model.config, video_root, cfg.video, features=features)
    data = batches(cfg, collator, rank, world, skip_batches=start * cfg.grad_accum)
    dtype = next(engine.module.parameters()).dtype
    for step in range(start + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        logs, kinds, cached = [], [], 0
        for micro in range(cfg.grad_accum):
            epoch, batch, batch_kinds = next(data)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            for key in ("pixel_values_videos", "video_embeds"):  # the collator gives one of them
                if key in batch:
                    batch[key] = batch[key].to(dtype)
            cached += len(batch_kinds) if "video_embeds" in batch else 0
            out = engine(**batch, generator=gate_generator(cfg.seed, step, micro, rank))
            engine.backward(out.loss)
            engine.step()
            logs.append(step_metrics(out, engine.module))
            kinds += batch_kinds
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
            row = {k: sum(m[k] for m in logs) / len(logs) for k in logs[0]}
            row.update(step=step, epoch=epoch, lr=engine.get_lr()[0], seconds=time.perf_counter() - t0,
                       samples=len(kinds) * world, mcq=kinds.count("mcq"), vqa=kinds.count("vqa"),
                       cached_videos=cached,
                       peak_mem_mib=peak_memory_mib(),
                       trainable_params=sum(p.numel() for p in engine.module.parameters() if p.requires_grad))
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            engine.save_checkpoint(str(run / CHECKPOINTS), tag=f"step-{step:07d}", client_state={"step": step})
            if rank == 0:
                _prune_checkpoints(run / CHECKPOINTS, cfg.keep_checkpoints)
    if rank == 0:
        export_final(engine.module, tokenizer, cfg, run / "final")
    torch.distributed.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="QTSplus training loop (one rank); start it with the deepspeed launcher")
    parser.add_argument("--config", required=True, help="train-config.json written by qtsplus train-selector")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args(argv)
    train(TrainConfig.model_validate_json(Path(args.config).read_text()))


if __name__ == "__main__":
    main()
