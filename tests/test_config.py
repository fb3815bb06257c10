"""`--set key=value` overrides (qtsplus.presets.apply_overrides), shared by every CLI command and deployment."""

from __future__ import annotations

import pytest

from qtsplus.evaluation.config import EvalConfig
from qtsplus.presets import apply_overrides
from qtsplus.training.config import TrainConfig


def test_overrides_set_known_settings_and_refuse_unknown_ones() -> None:
    cfg = TrainConfig.preset("smoke", data="d", out="o")
    new = apply_overrides(cfg, ["max_steps=3", "video.fps=2.0", "launcher.num_nodes=2", "lr=1e-2"])
    assert (new.max_steps, new.video.fps, new.launcher.num_nodes, new.lr) == (3, 2.0, 2, 0.01)
    assert cfg.max_steps != 3  # the original is untouched
    for bad, match in (("max_stepz=3", "no such setting"), ("video.fpz=1", "no such setting"),
                       ("max_steps.x=1", "not a section"), ("max_steps", "not key=value")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(cfg, [bad])


def test_overrides_add_keys_inside_free_form_dict_settings() -> None:
    vq = TrainConfig.preset("smoke-vqtoken", data="d", out="o")
    new = apply_overrides(vq, ["method_options.mode=adaptive", "method_budget=32"])
    assert new.method_options == {**vq.method_options, "mode": "adaptive"} and new.method_budget == 32
    qts = apply_overrides(TrainConfig.preset("smoke", data="d", out="o"), ["selector.tau_s=0.4"])
    assert qts.selector["tau_s"] == 0.4
    ev = EvalConfig.preset("smoke", data="d", checkpoint="c", out="o")
    new_ev = apply_overrides(ev, ["method_options.flexselect.reference_layer=1", "methods=[\"teacher\"]"])
    assert new_ev.method_options == {"flexselect": {"reference_layer": 1}} and new_ev.methods == ["teacher"]
    with pytest.raises(ValueError, match="nothing to train"):  # the result is still validated as a whole
        apply_overrides(vq, ["method=flexselect"])


def test_a_missing_dataset_or_checkpoint_is_named_with_what_to_run(tmp_path, prefect_env) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "half" / "captions").mkdir(parents=True)
    for args, expected in (
        (["train-selector", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")], "no such folder"),
        (["train-selector", "--data", str(tmp_path / "half"), "--out", str(tmp_path / "r")], "no captions/manifest"),
        (["evaluate", "--data", str(tmp_path / "half"), "--checkpoint", str(tmp_path / "c"), "--out",
          str(tmp_path / "e")], "no such checkpoint folder"),
    ):
        proc = subprocess.run([sys.executable, "-m", "qtsplus.cli", *args], env=prefect_env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]
