PY ?= python3
PIP = $(PY) -m pip

.PHONY: install demo test lint

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

demo: install
	giants report --out report
	@echo "report written to report/index.html and report/report.md"

lint:
	$(PY) -m ruff check src tests benchmarks

test: install lint
	$(PY) -m pytest -q -x --durations=15
