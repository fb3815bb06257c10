"""Write constraints.txt: the exact versions, in this environment, of everything the README's installs pull in.

Run after `make test` has installed the project with its test extras (or after an upgrade you want to adopt):

    python .ci/freeze_constraints.py > constraints.txt

Walks the requirement closure of `qtsplus[dev,test]` plus lmms-eval's lean set (installed with --no-deps, see
docs/lmms_eval.md) through the installed distributions, so packages that merely happen to be installed are left out.
torch is written without its local build label (2.13.0, not 2.13.0+cpu): the pin names the release, the index or a
local wheel supplies the build.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = [("qtsplus", {"dev", "test"}), ("lmms-eval", set())]
NO_DEPS = {"lmms-eval"}  # installed with --no-deps: their own requirement lists are not followed


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    env = default_environment()
    seen: dict[str, str] = {}
    todo = list(ROOTS)
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        key = norm(dist.metadata["Name"])
        if key in seen and not extras:
            continue
        seen[key] = dist.version
        if key in NO_DEPS and key != "qtsplus":
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate(env | {"extra": e}) for e in extras | {""}):
                continue
            todo.append((req.name, set(req.extras)))
    seen.pop("qtsplus", None)
    return seen


def main() -> int:
    print("# Exact versions for the README's installs (CI uses them): regenerate with")
    print("#   python .ci/freeze_constraints.py > constraints.txt   (after `make test` installed what you want to adopt)")
    print("# and commit; tests/test_install.py checks the environment against this file.")
    for name, version in sorted(closure().items()):
        print(f"{name}=={version.split('+')[0] if name == 'torch' else version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
