# The README's commands. `make test` is the whole test set-up: it installs what the tests need, with the pinned
# versions of constraints.txt, then lints and runs the suite. .ci/run calls exactly it.
PYTHON ?= python
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install smoke test

install:
	$(PIP_INSTALL) "torch==2.13.0" -e ".[dev,test]"
	@# lmms-eval's own dependency list would replace the CPU torch: install it alone (docs/lmms_eval.md)
	$(PIP_INSTALL) --no-deps "lmms-eval==0.7.3"
	@# docker-compose validates infra/docker/compose.yaml (no Docker engine needed); the compose test skips without it
	@command -v docker-compose >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq docker-compose >/dev/null; } || echo "docker-compose unavailable: the compose test will skip"

smoke:
	$(PIP_INSTALL) "torch==2.13.0" -e ".[dev]"
	qtsplus build-dataset --out runs/smoke --preset smoke

test: install
	ruff check .
	$(PYTHON) -m pytest -q
