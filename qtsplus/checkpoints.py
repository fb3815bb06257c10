"""Which project code a model checkpoint needs to load.

A QTSplus checkpoint (train-selector's `final/`, config `model_type` "qtsplus_qwen2_5_vl") needs the host model,
`qtsplus.host.model`, and through it the selectors; a plain Qwen2.5-VL or Qwen3 checkpoint needs none of the project's
model code. Loaders import the host model only through `host_model_module`, by name, and a stage's code fingerprint
adds `model_code(model_id)`: so editing the selectors invalidates the stages that load a QTSplus checkpoint, and not
the dataset stages whose teacher is a plain Qwen2.5-VL (the import closure alone cannot tell the two apart).

QTSplus checkpoints are read from a local folder (that is where train-selector writes them).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

QTSPLUS_MODEL_TYPE = "qtsplus_qwen2_5_vl"
HOST_MODULE = "qtsplus.host.model"


def is_qtsplus_checkpoint(model_id: str) -> bool:
    """True for a local checkpoint folder whose config says it is a QTSplus model."""
    config = Path(model_id) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == QTSPLUS_MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def model_code(model_id: str) -> tuple[str, ...]:
    """The project modules loading `model_id` imports: the host model for a QTSplus checkpoint, else none."""
    return (HOST_MODULE,) if is_qtsplus_checkpoint(model_id) else ()


def host_model_module(model_id: str) -> ModuleType | None:
    """The host model module, with its auto classes registered with transformers, when `model_id` needs it."""
    if not model_code(model_id):
        return None
    module = importlib.import_module(HOST_MODULE)
    module.register_auto_classes()
    return module
