"""Retraining on new captions: configuration and the promotion rule (the flow is flows/retrain.py)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PromotionRule(BaseModel):
    """A candidate replaces `current` only when it is not worse on the same evaluation set."""

    metric: str = Field("accuracy", description="a per-method entry of metrics.json (higher is better)")
    method: str = Field("qtsplus", description="whose metric is compared")
    min_delta: float = Field(0.0, description="candidate must reach current + min_delta (0: 'not worse')")


class RetrainConfig(BaseModel):
    """Where captions arrive, where versions go, and how each step is configured (presets + dotted overrides)."""

    inbox: str = Field(description="watched folder; new *.jsonl caption files are picked up on each run")
    registry: str = Field(description="model registry folder (versions, lineage, current pointer)")
    work: str = Field(description="working folder: combined captions, dataset, training runs, evaluations")
    video_root: str = Field(description="root of the video paths in the captions")
    build_preset: str = "smoke"
    build_overrides: list[str] = Field(default_factory=list)
    train_preset: str = "smoke"
    train_overrides: list[str] = Field(default_factory=list)
    eval_preset: str = "smoke"
    eval_overrides: list[str] = Field(default_factory=list)
    warm_start: bool = Field(True, description="train from the current version's checkpoint (else from the base)")
    promotion: PromotionRule = PromotionRule()


def decide(candidate: dict, current: dict | None, rule: PromotionRule) -> tuple[bool, str]:
    """(promote?, why) from the two runs' metrics.json on the same evaluation set."""
    if current is None:
        return True, "no current version"
    try:
        new, old = candidate[rule.method][rule.metric], current[rule.method][rule.metric]
    except KeyError as err:
        raise KeyError(f"metric {rule.method}.{rule.metric} missing from metrics.json") from err
    if new >= old + rule.min_delta:
        return True, f"{rule.method}.{rule.metric} {new:.4f} >= {old:.4f} + {rule.min_delta}"
    return False, f"{rule.method}.{rule.metric} {new:.4f} < {old:.4f} + {rule.min_delta}: worse, not promoted"
