"""The engine environment has no Prefect (docs/vllm.md): everything a stage worker runs must import without it."""

from __future__ import annotations

import json
import subprocess
import sys

# The modules a model stage's worker imports (its chunk functions and what they reach), and every other module of the
# library: none may need Prefect. Optional extras (lmms-eval, matplotlib, ...) may be missing; Prefect is what counts.
STAGE_WORKER_MODULES = [
    "qtsplus.workers",
    "qtsplus.stages.vscq1",
    "qtsplus.stages.teacher",
    "qtsplus.stages.common",
    "qtsplus.engines",
    "qtsplus.engines.transformers_engine",
    "qtsplus.engines.vllm_engine",
    "qtsplus.engines.null_engine",
    "qtsplus.shards",
    "qtsplus.video",
    "qtsplus.prompts",
    "qtsplus.fingerprint",
    "qtsplus.tiny",
    "schemas",
]

PROBE = r"""
import importlib, json, pkgutil, sys

class NoPrefect:
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" or name.startswith("prefect."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoPrefect())
import qtsplus
failures = {}
names = json.loads(sys.argv[1]) + [m.name for m in pkgutil.walk_packages(qtsplus.__path__, "qtsplus.")]
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "prefect":
            failures[name] = repr(e)
    except ImportError as e:  # an optional extra that is not installed: not this test's concern
        if "prefect" in repr(e):
            failures[name] = repr(e)
print(json.dumps({"failures": failures, "prefect_loaded": "prefect" in sys.modules}))
"""


def test_the_library_imports_without_prefect() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(STAGE_WORKER_MODULES)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"failures": {}, "prefect_loaded": False}
