# Two commands for a new user:  `make demo`  and  `make test`.
# Both create .venv (unless a virtual environment is active), install rlhf_fast with its
# native extension, then run the demo or the whole test suite.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override on a GPU machine, e.g. TORCH_SPEC='torch>=2.6'.
TORCH_SPEC ?= torch==2.13.0
JOBS ?= 2

ifdef VIRTUAL_ENV
PY := python
ENV_DIR := $(VIRTUAL_ENV)
else
PY := $(abspath $(VENV))/bin/python
ENV_DIR := $(abspath $(VENV))
endif
STAMP := $(ENV_DIR)/.rlhf_fast-installed
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup demo test test-fast check-cuda bench env clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py csrc_flags.py $(NATIVE_SOURCES)
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x "$(VENV)/bin/python" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel ninja
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
	@touch $(STAMP)

demo: setup
	$(PY) -m rlhf_fast.cli demo

env: setup
	$(PY) -m rlhf_fast.cli env

# Compile every CUDA source to an object with the extension's flags (no GPU needed).
check-cuda: setup
	$(PY) tools/check_cuda.py

# Triton kernels run under the CPU interpreter in a second pytest process, because
# TRITON_INTERPRET must be set before Triton is imported. Exit code 5 (no tests
# collected) is not a failure.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# two pytest-xdist workers (the test extra): the suite's wall time on a 2-core machine about halves
TEST_WORKERS ?= 2
test: setup check-cuda
	$(PYTEST) -n $(TEST_WORKERS) tests --ignore=tests/triton || [ $$? -eq 5 ]
	TRITON_INTERPRET=1 $(PYTEST) -n $(TEST_WORKERS) tests/triton || [ $$? -eq 5 ]

bench: setup
	$(PY) -m rlhf_fast.cli bench ops --quick

clean:
	rm -rf build *.egg-info rlhf_fast/_C*.so $(STAMP)
