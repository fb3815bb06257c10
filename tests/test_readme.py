"""The README's two set-up commands are the ones CI runs, and the pinned install they use is what is installed."""

from __future__ import annotations

import re
import shlex
import subprocess
from importlib import metadata

from packaging.requirements import Requirement

from tests.conftest import REPO


def _readme_commands() -> tuple[str, str]:
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert first_block and readme.index("```bash") < readme.index("\n## ")
    install_and_run, test = first_block.group(1).strip().splitlines()
    return install_and_run, test


def _make_recipe(target: str) -> list[str]:
    """The commands `make -n TARGET` would run (prerequisites included), as make prints them."""
    out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    install_and_run, test = _readme_commands()
    install, run = install_and_run.split(" && ")
    assert install.startswith("pip install -c constraints.txt") and '"torch==2.13.0"' in install
    assert run.startswith("qtsplus build-dataset") and "--preset smoke" in run
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert test in ci_commands, f"README's test command {test!r} is not what .ci/run runs: {ci_commands}"
    recipe = " ; ".join(_make_recipe(shlex.split(test)[-1]))
    # the test command installs what the tests need (pinned), lints, then runs pytest, in that order
    assert recipe.index("-c constraints.txt") < recipe.index("ruff check") < recipe.index("pytest")
    assert "lmms-eval" in recipe


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact versions: {line!r}"
            pins[_norm(req.name)] = spec.version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pins_satisfy_the_projects_own_requirements() -> None:
    """Every pinned version is allowed by pyproject (dependencies and the extras the README installs), so a fresh
    install with the constraints can resolve; a pin that contradicts pyproject fails here, not in CI's pip."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["dev"], *extras["test"]]
    # an extra may include others of this project ("qtsplus[orchestrator]"): check their requirements instead
    wanted = [r for line in wanted for r in (
        [x for e in Requirement(line).extras for x in extras[e]] if Requirement(line).name == "qtsplus" else [line])]
    pins = _constraints()
    for line in wanted:
        req = Requirement(line)
        name = _norm(req.name)
        assert name in pins, f"{req.name} is required but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} violates {line!r}"


def test_environment_matches_the_pins() -> None:
    """What is installed is what constraints.txt says (the README's commands install with it), so CI tests the pinned
    set and an upstream release cannot change it overnight. torch is compared without its build label."""
    wrong = {}
    for name, version in _constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, "not installed")
            continue
        if (installed.split("+")[0] if name == "torch" else installed) != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}; " \
                      "reinstall with `make install`, or adopt them with `python .ci/freeze_constraints.py`"
