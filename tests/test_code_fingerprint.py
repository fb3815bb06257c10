"""Cache keys follow the code: editing any module a cached task reaches invalidates its key, editing one it does not
reach leaves the key alone. Checked on every cached task kind with real edits in a temporary copy of the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qtsplus.fingerprint import module_closure
from tests.conftest import REPO

# every cached task kind: its task name, and the library module of the function it calls
ENTRIES = {
    "ingest-chunk": "qtsplus.ingest",
    "vscq1-chunk": "qtsplus.stages.vscq1",
    "vscq2-chunk": "qtsplus.stages.teacher",
    "vqa-chunk": "qtsplus.stages.teacher",
    "feature-chunk": "qtsplus.features.cache",
    "train-selector-run": "qtsplus.training.launch",
    "evaluate-run": "qtsplus.evaluation.evaluate",
}

# the real cache-key functions of the tasks, called with fixed arguments in a fresh interpreter
KEYS_SCRIPT = r"""
import dataclasses, json, sys
from qtsplus.build_config import BuildConfig
from qtsplus.evaluation.config import EvalConfig
from qtsplus.features.cache import VideoRef
from qtsplus.features.store import FeatureSpec
from pathlib import Path
from qtsplus.ingest import scan_input
from qtsplus.shards import ChunkResult, ShardFile
from qtsplus.training.config import TrainConfig
from qtsplus.video import SamplingConfig
from tasks.build_dataset import ingest_key, vqa_key, vscq1_key, vscq2_key
from tasks.evaluate import eval_key
from tasks.features import feature_key
from tasks.train_selector import training_key

build = BuildConfig.preset("smoke", out="/data/ds")
prev = ChunkResult(stage="s", chunk=0, input_fingerprint="i", read=1, kept=1, rejected=0,
                   files=[ShardFile(path="s/train_kept-00000.parquet", split="train_kept", rows=1, bytes=1, sha256="x")])
spec = scan_input(Path(sys.argv[1]), 4)[0]
feature = FeatureSpec(model_id="tiny/qwen2.5-vl", revision="r", video=SamplingConfig(), compute_dtype="fp32",
                      storage_dtype="fp32", hidden_size=64, patch_size=14, temporal_patch_size=2, merge_size=2)
keys = {
    "ingest-chunk": ingest_key(None, dict(spec=spec, cfg=build.ingest, video_root="/v", out="/data/ds")),
    "vscq1-chunk": vscq1_key(None, dict(prev=prev, cfg=build.vscq1, out="/data/ds")),
    "vscq2-chunk": vscq2_key(None, dict(prev=prev, cfg=build.teacher, video_root="/v", out="/data/ds")),
    "vqa-chunk": vqa_key(None, dict(prev=prev, cfg=build.teacher, video_root="/v", out="/data/ds")),
    "feature-chunk": feature_key(None, dict(spec=feature, chunk=0, videos=[VideoRef(video="a.mp4", sha256="s",
                                                                                      tokens=1)], out="/f")),
    "train-selector-run": training_key(None, dict(cfg=TrainConfig.preset("smoke", data="/data/ds", out="/run"),
                                                  dataset_fp="d")),
    "evaluate-run": eval_key(None, dict(cfg=EvalConfig.preset("smoke", data="/data/ds", checkpoint="/c", out="/e"),
                                        checkpoint_fp="c", data_fp="d")),
}
# a teacher that is a trained QTSplus checkpoint (a local folder): its stage also runs the host model and selectors
qtsplus_teacher = build.teacher.model_copy(update={"engine": dataclasses.replace(build.teacher.engine,
                                                                                 model_id=sys.argv[2])})
keys["vscq2-chunk, QTSplus teacher"] = vscq2_key(None, dict(prev=prev, cfg=qtsplus_teacher, video_root="/v",
                                                             out="/data/ds"))
print(json.dumps(keys))
"""


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's packages copied to a temporary folder that shadows the installed ones on sys.path."""
    root = tmp_path_factory.mktemp("copy")
    for package in ("qtsplus", "schemas", "tasks", "flows", "tests"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _keys(root: Path) -> dict[str, str]:
    spec = str(REPO / "examples" / "captions.jsonl")
    checkpoint = root / "qtsplus-checkpoint"  # what loaders read of a checkpoint to know which code it needs
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text('{"model_type": "qtsplus_qwen2_5_vl"}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, spec, str(checkpoint)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _edit(root: Path, module: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    if not path.exists():
        path = root.joinpath(*module.split("."), "__init__.py")
    path.write_text(path.read_text() + "\n# an edit\n")


def test_editing_a_module_invalidates_exactly_the_tasks_that_reach_it(package_copy: Path) -> None:
    # a module every task reaches, modules only some reach (features/store.py was missing from the hand-kept lists
    # of training and evaluation), modules one task reaches, and modules no cached task reaches
    edits = ["schemas.records", "qtsplus.features.store", "qtsplus.stages.common", "qtsplus.evaluation.metrics",
             "qtsplus.training.loop", "qtsplus.selectors.qtsplus.selector", "qtsplus.cli.commands", "qtsplus.retrain"]
    qtsplus_teacher = "vscq2-chunk, QTSplus teacher"
    expected = {
        "schemas.records": set(ENTRIES) | {qtsplus_teacher},
        "qtsplus.features.store": {"feature-chunk", "train-selector-run", "evaluate-run"},
        "qtsplus.stages.common": {"vscq1-chunk", "vscq2-chunk", "vqa-chunk", qtsplus_teacher},
        # the selectors shape what training and evaluation compute, and a stage whose teacher is a QTSplus
        # checkpoint, but not a dataset stage whose teacher is a plain Qwen2.5-VL
        "qtsplus.selectors.qtsplus.selector": {"train-selector-run", "evaluate-run", qtsplus_teacher},
        "qtsplus.evaluation.metrics": {"evaluate-run"},
        "qtsplus.training.loop": {"train-selector-run"},
        "qtsplus.cli.commands": set(),
        "qtsplus.retrain": set(),
    }
    before = _keys(package_copy)
    assert before == _keys(package_copy), "keys must be deterministic"
    for module in edits:
        _edit(package_copy, module)
        after = _keys(package_copy)
        changed = {kind for kind in after if after[kind] != before[kind]}
        assert changed == expected[module], f"editing {module} changed {sorted(changed)}"
        for kind in changed & set(ENTRIES):  # the closure the keys hash says the same
            assert module in module_closure(ENTRIES[kind])
        before = after


PROBE = r"""
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('qtsplus', 'schemas'))))
"""


@pytest.mark.parametrize("kind", sorted(ENTRIES))
def test_the_closure_holds_every_module_importing_the_entry_loads(kind: str) -> None:
    """Soundness: what Python actually loads for a task's library module is inside the computed closure (which also
    follows lazy imports, so it may hold more)."""
    out = subprocess.run([sys.executable, "-c", PROBE, ENTRIES[kind]], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout))
    assert loaded <= set(module_closure(ENTRIES[kind])), loaded - set(module_closure(ENTRIES[kind]))
