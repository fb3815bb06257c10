"""Flow `retrain`: new captions -> incremental dataset -> training -> evaluation -> promotion when not worse."""

from pathlib import Path

from prefect import flow

from flows.build_dataset import build_dataset
from flows.evaluate import evaluate
from flows.train_selector import train_selector
from qtsplus.build_config import BuildConfig
from qtsplus.evaluation.config import EvalConfig
from qtsplus.inbox import Inbox
from qtsplus.presets import apply_overrides
from qtsplus.registry import Registry
from qtsplus.retrain import RetrainConfig
from qtsplus.training.config import TrainConfig
from tasks.retrain import record_no_change, record_version, take_new_captions


@flow(name="retrain", log_prints=True)
def retrain(config: RetrainConfig) -> dict:
    """One retraining round. Runs on one registry never overlap (the registry lock; deployments also enqueue)."""
    work = Path(config.work).resolve()
    registry = Registry(config.registry)
    with registry.lock():
        new_files = take_new_captions(config)
        current = registry.current()
        # nothing new, and nothing taken earlier that a failed first round left untrained
        if not new_files and (current is not None or not Inbox(config.inbox, work).ledger()):
            print("no new caption files: nothing to do")
            return record_no_change(config, current)
        dataset = work / "dataset"
        build = apply_overrides(BuildConfig.preset(config.build_preset, input=str(work / "captions.jsonl"),
                                                   video_root=config.video_root, out=str(dataset)),
                                config.build_overrides)
        build_dataset(build, progress=False)

        version = registry.next_version()
        base = str(registry.checkpoint(current)) if config.warm_start and current else None
        train = apply_overrides(TrainConfig.preset(config.train_preset, data=str(dataset), out=str(work / "runs" / version),
                                                   base_model=base), config.train_overrides)
        trained = train_selector(train)

        def judged(checkpoint: str, name: str) -> str:
            cfg = apply_overrides(EvalConfig.preset(config.eval_preset, data=str(dataset), checkpoint=checkpoint,
                                                    out=str(work / "evals" / name)), config.eval_overrides)
            return evaluate(cfg).out

        candidate_eval = judged(trained.final, version)
        current_eval = judged(str(registry.checkpoint(current)), f"{current}-vs-{version}") if current else None
        return record_version(config, version, current, trained.final, candidate_eval, current_eval, str(dataset),
                              train.model_dump(mode="json"), new_files)
