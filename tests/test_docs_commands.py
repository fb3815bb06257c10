"""Every command the README and docs/ show runs as written: `qtsplus ...` lines parse with the real CLI and build their
config (presets, arguments and `--set` keys are checked), benchmark and module commands exist and accept the flags
the docs give them, make targets and scripts exist.

Synopsis lines are read as commands without their optional `[...]` parts; `\\` continuations are joined and
`# comments` dropped.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache

import pytest

from tests.conftest import REPO

PREFIXES = ("qtsplus ", "python -m benchmarks.", "python benchmarks/", "python -m qtsplus.", "make ", "bash .ci/")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command line in README.md and docs/*.md, fenced or inline."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                found.append((path.name, line))
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S)):
            found.append((path.name, span))
    commands = []
    for where, line in found:
        line = re.sub(r"\s+#.*$", "", line.strip())
        line = re.sub(r"^\$\s*", "", line)
        if line.startswith(PREFIXES) and not re.search(r"\b(NAME|FLOW|STAGE)\b", line):  # generic patterns
            commands.append((where, _without_optional_parts(line)))
    return sorted(set(commands))


def _without_optional_parts(line: str) -> str:
    while re.search(r"\[[^\[\]]*\]", line):
        line = re.sub(r"\s*\[[^\[\]]*\]", "", line)
    return line.split(" > ")[0].split(" | ")[0].strip()


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    kinds = {cmd.split()[0] + " " + cmd.split()[1].split(".")[0] for _, cmd in COMMANDS}
    assert len(COMMANDS) >= 15 and any(k.startswith("qtsplus") for k in kinds), COMMANDS


@cache
def _help(module: str, *subcommand: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, *subcommand, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"python -m {module} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_runs_as_written(where: str, command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "qtsplus":
        from qtsplus.cli import build_parser, config_for

        if len(argv) == 2:  # a command named in prose: it must exist
            assert argv[1] in build_parser(argv[1:])._subparsers._group_actions[0].choices, f"{where}: no command"
            return
        try:
            args = build_parser(argv[1:]).parse_args(argv[1:])
        except SystemExit as exit_:
            pytest.fail(f"{where}: `{command}` does not parse (exit {exit_.code})")
        if args.command != "serve" and "--help" not in argv:
            config_for(args.run, args)  # presets, arguments and --set keys must exist
    elif argv[:2] == ["python", "-m"] or argv[0] == "python":
        module = argv[2] if argv[1] == "-m" else argv[1].removesuffix(".py").replace("/", ".")
        subcommand: tuple[str, ...] = ()
        if module == "qtsplus.evaluation.lmms_eval_adapter":  # lmms-eval's CLI: flags without a subcommand are `eval`'s
            pytest.importorskip("lmms_eval")
            subcommand = ("eval",)
        flags = {a.split("=")[0] for a in argv if a.startswith("--")}
        if not flags:  # a module named in prose: it must exist
            import importlib.util

            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
            return
        help_text = _help(module, *subcommand)
        missing = sorted(f for f in flags if f not in help_text)
        assert not missing, f"{where}: `{command}` uses flags that `python -m {module}` does not have: {missing}"
    elif argv[0] == "make":
        out = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, f"{where}: `{command}`: {out.stderr}"
    else:
        assert (REPO / argv[1]).is_file(), f"{where}: `{command}`: no such script"
