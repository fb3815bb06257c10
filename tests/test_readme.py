"""The README's two set-up commands are the ones CI runs."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block and readme.index("```bash") < readme.index("\n## ")
    install_and_run, test = first_block.group(1).strip().splitlines()
    install, run = install_and_run.split(" && ")
    assert install.startswith("pip install") and run.startswith("qtsplus build-dataset") and "--preset smoke" in run
    ci = (REPO / ".ci" / "run").read_text()
    assert install.replace("pip install", "python -m pip install -q") in ci
    assert test in ci.splitlines()
