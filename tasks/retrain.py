"""Prefect tasks of retrain: take new captions from the inbox, record a version, promote it when it is not worse."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from qtsplus.inbox import Inbox, InboxFile
from qtsplus.registry import Registry
from qtsplus.retrain import RetrainConfig, decide
from qtsplus.shards import manifest_digests


@task(name="take-new-captions", cache_policy=NO_CACHE)
def take_new_captions(config: RetrainConfig) -> list[InboxFile]:
    """Append caption files that arrived since the last run to the combined caption file."""
    inbox = Inbox(config.inbox, config.work)
    return inbox.take(inbox.pending())


@task(name="record-no-change", cache_policy=NO_CACHE)
def record_no_change(config: RetrainConfig, current: str | None) -> dict:
    """Nothing arrived since the last round: say so in the same `retrain-decision` artifact a round would write."""
    why = "no new captions"
    create_markdown_artifact(
        key="retrain-decision",
        markdown=f"# {why}: nothing to train\n\nNo new `*.jsonl` caption file in `{config.inbox}` since the last run; "
                 f"current version: {current or 'none yet'}. Drop caption files there and run again.\n",
        description="Retrain promotion decision",
    )
    return {"version": None, "promoted": False, "decision": why, "current": current}


@task(name="record-version", cache_policy=NO_CACHE)
def record_version(config: RetrainConfig, version: str, parent: str | None, checkpoint: str, candidate_eval: str,
                   current_eval: str | None, dataset: str, train_config: dict, new_files: list[InboxFile]) -> dict:
    """Add the candidate to the registry with its lineage; move `current` to it if it is not worse."""
    registry = Registry(config.registry)
    candidate = json.loads((Path(candidate_eval) / "metrics.json").read_text())
    current = json.loads((Path(current_eval) / "metrics.json").read_text()) if current_eval else None
    promote, why = decide(candidate, current, config.promotion)
    lineage = {
        "version": version, "parent": parent, "promoted": promote, "decision": why,
        "dataset": dataset,
        "dataset_manifests": manifest_digests(Path(dataset)),
        "train_config": train_config, "new_caption_files": [f.model_dump() for f in new_files],
        "evaluation": candidate_eval, "compared_with": current_eval,
        "parent_metrics_on_this_eval": current,
    }
    registry.add(version, Path(checkpoint), candidate, lineage)
    if promote:
        registry.promote(version)
    create_markdown_artifact(
        key="retrain-decision",
        markdown=f"# {version}: {'promoted' if promote else 'not promoted'}\n\n{why}\n\nparent: {parent}; "
                 f"current now: {registry.current()}; new caption files: {[f.name for f in new_files]}\n",
        description="Retrain promotion decision",
    )
    return {"version": version, "promoted": promote, "decision": why, "current": registry.current()}
