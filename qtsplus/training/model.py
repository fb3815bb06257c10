"""The model a training run optimises: QTSplus on a Qwen2.5-VL base, frozen per variant, optional LoRA on the LM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qtsplus.host.model import QTSPLUS_METHOD, QTSplusForConditionalGeneration, register_auto_classes
from qtsplus.tiny import TINY_MODEL_IDS, resolve_model
from qtsplus.training.config import TrainConfig


def build_model(cfg: TrainConfig) -> tuple[QTSplusForConditionalGeneration, object]:
    """(model, tokenizer). `cfg.method` picks the selector that trains (QTSplus, or a trainable method of
    qtsplus.selectors, built fresh or continued from a checkpoint of the same method). Variant `selector`: vision tower
    and LM frozen. `selector+lm`: the LM trains too (all of
    it, or only LoRA adapters when `cfg.lora` is set). The vision tower is always frozen (paper Sec. 4.2)."""
    from transformers import AutoConfig, AutoTokenizer

    if cfg.lora is not None and cfg.variant != "selector+lm":
        raise ValueError("LoRA trains the LM: use variant 'selector+lm' with lora")
    register_auto_classes()
    path, revision = resolve_model(cfg.base_model, cfg.base_revision)
    kwargs = {"revision": None if cfg.base_model in TINY_MODEL_IDS else revision}
    base_config = AutoConfig.from_pretrained(path, **kwargs)
    selector_config = dict(getattr(base_config, "selector_config", None) or {}) | cfg.selector  # continue or start
    method = {"selection_method": cfg.method}
    if cfg.method != QTSPLUS_METHOD:  # a warm start from a checkpoint of the same method continues its config
        same = getattr(base_config, "selection_method", QTSPLUS_METHOD) == cfg.method
        previous = dict(getattr(base_config, "method_config", None) or {}) if same else {}
        method |= {"method_config": previous | cfg.method_options, "method_budget": cfg.method_budget}
    model = QTSplusForConditionalGeneration.from_pretrained(
        path, selector_config=selector_config, dtype=torch.float32, **method, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if cfg.variant == "base":  # the host learns the task with every visual token: selection off, selector frozen
        model.selection = False
        model.requires_grad_(True)
        model.selector.requires_grad_(False)
        model.model.visual.requires_grad_(cfg.train_vision)
    else:
        model.freeze_base(train_lm=cfg.variant == "selector+lm" and cfg.lora is None)
    if cfg.lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules)
        inject_adapter_in_model(lora, model.model.language_model)
        for name, param in model.model.language_model.named_parameters():
            param.requires_grad_("lora_" in name)
    model.train()
    return model, tokenizer


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())
            merged += 1
    return merged


def teacher_of(base_model: str) -> str:
    """The plain Qwen2.5-VL at the root of a chain of warm starts (a QTSplus base names its own teacher)."""
    record = Path(base_model) / "qtsplus_training.json"
    if record.is_file():
        data = json.loads(record.read_text())
        if data.get("variant") == "base":  # a host trained by variant `base` is a plain Qwen2.5-VL: its own teacher
            return base_model
        return data.get("teacher_model", data["base_model"])
    return base_model


def save_plain_qwen(model: QTSplusForConditionalGeneration, dest: Path) -> None:
    """Save the host without its selector, as a plain Qwen2.5-VL checkpoint (what variant `base` exports)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    extra = ("selector_config", "selection_method", "method_config", "method_budget", "model_type", "architectures")
    config = Qwen2_5_VLConfig.from_dict({k: v for k, v in model.config.to_dict().items() if k not in extra})
    plain = Qwen2_5_VLForConditionalGeneration(config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("selector.")})
    plain.generation_config = model.generation_config
    plain.save_pretrained(dest)


def export_final(model: QTSplusForConditionalGeneration, tokenizer, cfg: TrainConfig, dest: Path) -> Path:
    """Write a `from_pretrained`-loadable QTSplus checkpoint (weights, config, tokenizer, training record); variant
    `base`: a plain Qwen2.5-VL checkpoint (the trained host, usable as `base_model` of a later run)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora is not None:
        merge_lora(model.model.language_model)
    if cfg.variant == "base":
        save_plain_qwen(model, tmp)
        source, _ = resolve_model(cfg.base_model, cfg.base_revision)
        for processor in Path(source).glob("*preprocessor_config.json"):  # vLLM reads them
            shutil.copy(processor, tmp / processor.name)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "qtsplus_training.json").write_text(json.dumps(
        {"config": cfg.model_dump(mode="json"), "base_model": cfg.base_model, "teacher_model": teacher_of(cfg.base_model),
         "variant": cfg.variant, "method": cfg.method,
         "rho_bar": float(model.selector.rho_bar) if model.uses_qtsplus and cfg.variant != "base" else None},
        indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
