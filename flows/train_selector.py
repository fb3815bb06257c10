"""Flow `train-selector`: DeepSpeed training of QTSplus on a built dataset (paper Sec. 3.3, 4.2)."""

from pathlib import Path

from prefect import flow

from qtsplus.training.config import TrainConfig
from qtsplus.training.launch import TrainResult
from tasks.common import run_cached
from tasks.train_selector import cached_train_run, dataset_fingerprint, final_intact, publish_training


@flow(name="train-selector", log_prints=True)
def train_selector(config: TrainConfig) -> TrainResult:
    """Train (or reuse the cached result of an identical run), then publish curves and metrics."""
    out = Path(config.out).resolve()
    config = config.model_copy(update={"out": str(out), "data": str(Path(config.data).resolve())})
    kwargs = dict(cfg=config, dataset_fp=dataset_fingerprint(config.data))
    result, state = run_cached(cached_train_run(out), kwargs, final_intact)
    publish_training(result, config, state)
    return result
