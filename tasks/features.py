"""Prefect tasks of cache-features: thin, cached wrappers around `qtsplus.features.cache`.

One task per chunk of videos (the chunks of build-dataset). Its cache key is content-only, like build-dataset's: the
content sha256 of the chunk's videos + the feature set's spec (vision model id and resolved revision, a stat stamp of
a local checkpoint's weights, frame sampling, compute and storage dtype, patch geometry) + the code of the feature
modules + the store folder, never a run id. Cache records and results live in `<store>/.cache/prefect`. A cached
result whose shard is missing or whose bytes no longer match the recorded sha256 is recomputed ("Recomputed").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from pydantic import BaseModel

from qtsplus.atomic import write_text_atomic
from qtsplus.features.cache import (
    FeatureChunkResult,
    FeaturePlan,
    VideoRef,
    chunk_shards_verified,
    depends_on,
    finalize_features,
    plan_features,
    run_feature_chunk,
    videos_fingerprint,
)
from qtsplus.features.config import FeatureConfig
from qtsplus.features.store import FeatureManifest, FeatureSpec
from qtsplus.fingerprint import fingerprint
from tasks.chunks import on_replica, run_verified
from tasks.common import TASK_OPTIONS, cached

STAGE = "features"


def feature_key(ctx: TaskRunContext, p: dict[str, Any]) -> str:
    spec: FeatureSpec = p["spec"]
    return fingerprint("feature-chunk", depends_on(spec), p["chunk"], videos_fingerprint(p["videos"]), p["out"])


@task(name="plan-features", cache_policy=NO_CACHE)
def plan_task(cfg: FeatureConfig) -> FeaturePlan:
    """Videos per chunk, their content hashes and the expected storage (never cached: it is how changes are seen)."""
    return plan_features(cfg)


@task(name="feature-chunk", task_run_name="features-{chunk:05d}", **TASK_OPTIONS)
def feature_chunk(out: str, chunk: int, videos: list[VideoRef], spec: FeatureSpec, video_root: str,
                  device: str) -> FeatureChunkResult:
    return on_replica(STAGE, run_feature_chunk, Path(out), chunk, videos, spec, Path(video_root), device,
                      videos_fingerprint(videos))


@dataclass
class FeatureRun:
    results: list[FeatureChunkResult] = field(default_factory=list)
    states: dict[int, str] = field(default_factory=dict)


def run_feature_tasks(out: Path, calls: list[dict[str, Any]], progress: bool = True,
                      concurrency: int | None = None) -> FeatureRun:
    """One cached task per chunk; a cached result whose shard fails its checksum is recomputed, and so is every
    chunk when cached chunks disagree on the vision weights that computed them. `concurrency`: task threads."""
    runnable = cached(feature_chunk, out, feature_key)
    results, states = run_verified(runnable, calls, lambda r: chunk_shards_verified(out, r), "features", progress,
                                   concurrency)
    run = FeatureRun()
    by_index = dict(enumerate(results))
    run.states = {r.chunk: states[i] for i, r in enumerate(results)}
    if len({r.vision_sha256 for r in by_index.values() if r.vision_sha256}) > 1:
        refreshed = runnable.with_options(refresh_cache=True)
        for i, kwargs in enumerate(calls):
            by_index[i] = refreshed.submit(**kwargs).result()
            run.states[by_index[i].chunk] = "Recomputed"
    run.results = [by_index[i] for i in range(len(calls))]
    return run


@task(name="finalize-features", cache_policy=NO_CACHE)
def finalize_task(out: Path, spec: FeatureSpec, run: FeatureRun, plan: FeaturePlan) -> FeatureManifest:
    return finalize_features(out, spec, run.results, plan.missing)


class FeatureSummary(BaseModel):
    """What a cache-features run returns (and writes to <store>/run-report.json)."""

    out: str
    set_id: str
    model_id: str
    storage_dtype: str
    videos: int
    failed: dict[str, str]
    bytes: int
    expected_bytes: int
    tokens: int
    states: dict[int, str]


@task(name="publish-features", cache_policy=NO_CACHE)
def publish_features(out: Path, manifest: FeatureManifest, run: FeatureRun, plan: FeaturePlan) -> FeatureSummary:
    summary = FeatureSummary(
        out=str(out), set_id=manifest.set_id, model_id=manifest.spec.model_id,
        storage_dtype=manifest.spec.storage_dtype, videos=len(manifest.videos), failed=manifest.failed,
        bytes=manifest.bytes, expected_bytes=plan.expected_bytes, tokens=sum(r.tokens for r in run.results),
        states=run.states,
    )
    report = summary.model_dump(mode="json") | {"spec": manifest.spec.model_dump(mode="json"),
                                                "finished_at": datetime.now(timezone.utc).isoformat()}
    write_text_atomic(out / "run-report.json", json.dumps(report, indent=2) + "\n")
    create_table_artifact(
        key="cache-features-chunks",
        table=[{"chunk": r.chunk, "state": run.states[r.chunk], "videos": len(r.entries), "tokens": r.tokens,
                "bytes": sum(f.bytes for f in r.files), "failed": len(r.failed),
                "replica": r.replica.get("replica", ""), "host": r.replica.get("host", "")} for r in run.results],
        description=f"Feature chunks of set {manifest.set_id} in {out}",
    )
    create_markdown_artifact(
        key="cache-features-summary",
        markdown=f"# Feature set `{manifest.set_id}`\n\n{plan.storage_line()}\n\n"
                 f"written: {summary.videos} videos, {summary.bytes:,} bytes; failed: {len(summary.failed)}\n",
        description="Feature cache",
    )
    return summary
