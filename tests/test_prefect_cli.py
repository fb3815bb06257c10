"""The standard `prefect` CLI against a real local server: the listings a Prefect user types first, and the UI's API URL.

The listings failed with 422 ('body.limit': Input should be a valid integer, input None) under fastapi>=0.151, which
validates the client's explicit nulls instead of using the route's defaults (pyproject.toml pins fastapi<0.151).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

MAKE = textwrap.dedent('''
    """A flow run with an artifact, and a deployment of the flow, on the server at PREFECT_API_URL."""
    import sys

    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.client.orchestration import get_client

    tag = sys.argv[1]


    @flow(name=f"cli-check-{tag}", flow_run_name=f"run-{tag}")
    def cli_check() -> None:
        create_markdown_artifact(key=f"artifact-{tag}", markdown="# made by tests/test_prefect_cli.py")


    if __name__ == "__main__":
        cli_check()
        with get_client(sync_client=True) as client:
            client.create_deployment(flow_id=client.create_flow(cli_check), name=f"deployment-{tag}",
                                     entrypoint="cli_check.py:cli_check")
''')


def prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`prefect ARGS` in a subprocess, wide enough that rich does not truncate the table cells."""
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env | {"COLUMNS": "300"}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_listing_commands_show_what_was_created(prefect_server, tmp_path: Path) -> None:
    _, env = prefect_server
    tag = uuid.uuid4().hex[:8]
    script = tmp_path / "cli_check.py"
    script.write_text(MAKE)
    made = subprocess.run([sys.executable, str(script), tag], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]

    expected = {
        ("flow-run", "ls"): [f"cli-check-{tag}", f"run-{tag}", "COMPLETED"],
        ("deployment", "ls"): [f"cli-check-{tag}/deployment-{tag}"],
        ("artifact", "ls"): [f"artifact-{tag}"],
    }
    for command, names in expected.items():
        out = prefect(list(command), env)
        assert out.returncode == 0, f"prefect {' '.join(command)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert "Unprocessable" not in out.stdout + out.stderr  # the 422's reason (a bare "422" can be in a UUID)
        for name in names:
            assert name in out.stdout, f"{name!r} not listed by prefect {' '.join(command)}:\n{out.stdout}"


def test_the_ui_is_told_the_api_address_of_its_own_server(prefect_server) -> None:
    api, _ = prefect_server
    assert not api.startswith("http://127.0.0.1:4200/")  # a free port: the case that needs PREFECT_UI_API_URL
    settings = json.loads(urllib.request.urlopen(api.removesuffix("/api") + "/ui-settings", timeout=10).read())
    assert settings["api_url"] == api


def test_a_cli_run_without_a_server_does_not_warn_about_the_gpu_limit(smoke) -> None:
    data, _, _ = smoke
    output = (data.parent / "cli.log").read_text()
    assert "vqa" in output  # the build's own summary: this is the run's console output
    # prefect's WARNING for a missing limit, once per GPU stage before tasks/gpu.py checked for the limit first
    # (the smoke env logs WARNING and above)
    assert "do not exist - skipping acquisition" not in output
