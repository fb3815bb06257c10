"""The smoke build-dataset with every model stage on vLLM: the flow runs here (the orchestrator environment, Prefect)
and each stage worker under the engine environment's interpreter ($QTSPLUS_ENGINE_PYTHON, which has vLLM and no
Prefect). .ci/vllm sets it; without it (or without vLLM there) the test skips.
"""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest

from qtsplus.shards import load_manifest
from tests.conftest import run_cli

ENGINE_PY = os.environ.get("QTSPLUS_ENGINE_PYTHON")


def _has_vllm(python: str | None) -> bool:
    if not python:
        return False
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _has_vllm(ENGINE_PY), reason="needs $QTSPLUS_ENGINE_PYTHON with vLLM (.ci/vllm sets it)"),
]

# CPU settings for the tiny models (their context is 4096 tokens; VSCQ1's smoke budget is 4096 new tokens).
VLLM_CPU = [
    arg
    for stage in ("vscq1", "teacher")
    for key, value in (("backend", "vllm"), ("kv_cache_gib", "0.25"), ("enforce_eager", "true"), ("max_model_len", "4096"))
    for arg in ("--set", f"{stage}.engine.{key}={value}")
]


def test_smoke_build_with_every_model_stage_on_vllm(prefect_env, tmp_path) -> None:
    out, log = tmp_path / "ds", tmp_path / "loads.jsonl"
    env = {**prefect_env, "QTSPLUS_ENGINE_PYTHON": ENGINE_PY, "QTSPLUS_ENGINE_LOAD_LOG": str(log),
           "VLLM_CPU_CI_ENV": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_cli(["build-dataset", "--out", str(out), "--preset", "smoke", *VLLM_CPU], env)
    loads = [json.loads(line) for line in log.read_text().splitlines()]
    # one load per model stage, each by vLLM (which this environment does not have: so in the engine environment)
    assert [(x["model_id"], x["backend"]) for x in loads] == [
        ("tiny/qwen3", "vllm"), ("tiny/qwen2.5-vl", "vllm"), ("tiny/qwen2.5-vl", "vllm")
    ]
    for stage in ("captions", "vscq1", "vscq2", "vqa"):
        manifest = load_manifest(out, stage)
        assert manifest.read == manifest.kept + manifest.rejected, stage
        rows: dict[str, int] = {}
        for f in manifest.files:  # every shard loads
            rows[f.split] = rows.get(f.split, 0) + pq.read_table(out / f.path).num_rows
        rows.pop("rejects", None)
        assert rows == {k: v for k, v in manifest.rows_per_split.items() if k != "rejects"}, stage
    vscq1, vscq2 = load_manifest(out, "vscq1"), load_manifest(out, "vscq2")
    questions = sum(v for k, v in vscq1.rows_per_split.items() if k != "rejects")
    assert questions > 0 and vscq2.read == questions  # the tiny Qwen3 wrote parseable questions through vLLM
    assert load_manifest(out, "vqa").read == vscq2.rows_per_split.get("train_kept", 0) + vscq2.rows_per_split.get(
        "eval_kept", 0
    )

    run_cli(["build-dataset", "--out", str(out), "--preset", "smoke", *VLLM_CPU], env)
    assert len(log.read_text().splitlines()) == len(loads)  # all cached: no worker spawned, no model loaded
