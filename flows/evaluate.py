"""Flow `evaluate`: accuracy, tokens and latency of a QTSplus checkpoint against the teacher and other selectors."""

from pathlib import Path

from prefect import flow

from qtsplus.evaluation.config import EvalConfig
from qtsplus.evaluation.evaluate import EvalSummary
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
    runner = cached_evaluate_run(Path(config.out))
    ckpt_fp, data_fp = checkpoint_fingerprint(config.checkpoint), eval_data_fingerprint(config.data)
    state = runner(config, ckpt_fp, data_fp, return_state=True)
    summary: EvalSummary = state.result()
    if not report_intact(summary):
        summary = runner.with_options(refresh_cache=True)(config, ckpt_fp, data_fp)
    publish_evaluation(summary, state.name)
    return summary
