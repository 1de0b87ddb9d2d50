PY ?= python3
PIP = $(PY) -m pip
# pip-tools for `make lock`, in a virtualenv of its own (it upgrades pip there), made from $(PY)
LOCK_VENV ?= build/lock-venv
PIP_TOOLS = pip-tools==7.7.0
# The test files that hold CUDA tests: test_cuda_*.py, and any other that skips without CUDA. `make test-gpu`
# runs the tests in them marked `cuda` (tests/conftest.py marks every test that skips without CUDA).
GPU_TEST_FILES = $(sort $(wildcard tests/test_cuda_*.py) \
                   $(shell grep -l -E 'cuda\.is_available\(\)|^@cuda$$' tests/test_*.py))

.PHONY: install lock demo test test-gpu lint

# torch (and Triton) first, from requirements/torch-cpu.txt (the CPU wheel on this machine's disk), then the
# package with its test extra at the versions in requirements/lock.txt (`make lock` writes it).
install:
	$(PIP) install -q -r requirements/torch-cpu.txt
	$(PIP) install -q -c requirements/lock.txt -c requirements/torch-cpu.txt -e ".[test]"

# Re-resolve requirements/lock.txt from pyproject.toml's dependencies and [test] extra (latest releases that fit,
# keeping the current pins where they still fit; `make lock UPGRADE=1` moves every pin to the newest). pip-tools
# resolves with pip itself, so it honours this machine's pip configuration (its find-links with the local CPU
# torch wheel, its torch cap); uv does not read pip's configuration and would resolve the multi-GB CUDA torch.
# torch and Triton are left out of the lock (requirements/torch-cpu.txt pins them for the CPU suite), so that a
# GPU machine keeps its own CUDA builds under the same lock (`make test-gpu`).
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PY) -m venv $(LOCK_VENV) && \
	  $(LOCK_VENV)/bin/python -m pip install -q "$(PIP_TOOLS)"; }
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile -q --extra test --strip-extras \
	  --constraint requirements/torch-cpu.txt --unsafe-package torch --unsafe-package triton \
	  --unsafe-package setuptools --unsafe-package pip --no-emit-index-url --no-emit-find-links \
	  $(if $(UPGRADE),--upgrade) --output-file requirements/lock.txt pyproject.toml

demo: install
	$(PY) -m giants report --out report
	@echo "report written to report/index.html and report/report.md"

lint:
	$(PY) -m ruff check src tests benchmarks

test: install lint
	$(PY) -m pytest -q -x --durations=15

# The CUDA tests, on a machine with a CUDA GPU and its own CUDA torch, which is kept: torch, Triton and the
# nvidia-*/cuda-* packages are pinned to the installed versions for the install (requirements/installed_pins.py).
# Where the locked test dependencies cannot be installed (no network), giants alone is installed over the
# packages already there.
test-gpu:
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { \
	  echo "make test-gpu: needs a CUDA GPU (torch.cuda.is_available() is False for $(PY))" >&2; exit 1; }
	@pins=$$(mktemp) && $(PY) requirements/installed_pins.py > $$pins && cat $$pins && \
	  { $(PIP) install -q -c requirements/lock.txt -c $$pins -e ".[test]" || { \
	    echo "make test-gpu: the locked test dependencies did not install; installing giants alone (--no-deps)" >&2; \
	    $(PIP) install -q --no-deps --no-build-isolation -e .; }; }; \
	  rc=$$?; rm -f $$pins; exit $$rc
	$(PY) -m pytest -q -rs -m cuda $(GPU_TEST_FILES)

# The request fuzzers (tests/test_serve_hardening.py, test_fuzz_*) with fresh inputs for FUZZ_SECONDS each, and the
# checkpoint-parser fuzzers with 1,000-2,000 fresh inputs each, under
# the hypothesis profile giants-fuzz (CI replays the fixed examples of giants-ci); failures land in .hypothesis/.
FUZZ_SECONDS ?= 300
.PHONY: fuzz
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -x -k fuzz --timeout=0 tests/test_serve_hardening.py
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -x -k "fuzz or hypothesis" --timeout=0 \
	  tests/test_checkpoint_bad_input.py tests/test_checkpoint_hardening.py
