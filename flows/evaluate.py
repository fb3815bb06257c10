"""Flow `evaluate`: accuracy, tokens and latency of a QTSplus checkpoint against the teacher and other selectors."""

from pathlib import Path

from prefect import flow

from qtsplus.evaluation.config import EvalConfig
from qtsplus.evaluation.evaluate import EvalSummary
from tasks.common import run_cached
from tasks.evaluate import (
    cached_evaluate_run,
    checkpoint_fingerprint,
    eval_data_fingerprint,
    publish_evaluation,
    report_intact,
)


@flow(name="evaluate", log_prints=True)
def evaluate(config: EvalConfig) -> EvalSummary:
    """Evaluate (or reuse the cached report of an identical evaluation), then publish the report."""
    config = config.model_copy(update={k: str(Path(getattr(config, k)).resolve()) for k in ("data", "checkpoint", "out")})
    kwargs = dict(cfg=config, checkpoint_fp=checkpoint_fingerprint(config.checkpoint),
                  data_fp=eval_data_fingerprint(config.data))
    summary, state = run_cached(cached_evaluate_run(Path(config.out)), kwargs, report_intact)
    publish_evaluation(summary, config, state)
    return summary
