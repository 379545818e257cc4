# SlicerCTDiffusion: the two commands a new user needs are `make demo` and `make test`.
# Both create the virtual environment at .venv on first use (`make setup` does only that); `make test` also sets up
# what only the tests use (`make test-setup`: DiffDRR and, as root where apt-get is at hand, dicom3tools).
# Nothing but `make test` / `make test-setup` ever installs a system package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own, so that no loose requirement pulls another build. PyPI's Linux wheels
# are CUDA builds of several GB, so pip also looks in TORCH_INDEX, PyTorch's index of CPU builds: the same version
# with a "+cpu" label is preferred to PyPI's. For a GPU: TORCH_INDEX=https://download.pytorch.org/whl/cu128 (a
# "+cu128" build); TORCH_INDEX= for PyPI alone. An index that cannot be reached is passed over with a warning.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.setup-stamp
TEST_STAMP := $(VENV)/.test-setup-stamp

.PHONY: setup test-setup demo test lint format clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --retries 1 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,test,demo]"
	touch $(STAMP)

# What only the tests use; `make demo` never runs this.
$(TEST_STAMP): $(STAMP)
	# DiffDRR: the reference renderer the DRR test compares against. Installed --no-deps (its GPU and plotting
	# extras stay out) after the three packages it imports, so that pip never finds an installed diffdrr whose other
	# requirements are missing and prints no "dependency resolver ... diffdrr requires kornia" warning.
	$(PY) -m pip install -q fastcore==2.2.39 pandas==3.1.1 torchio==1.2.1
	$(PY) -m pip install -q --no-deps diffdrr==0.6.1
	# dciodvfy (dicom3tools) validates the DICOM series the tests write; installed where apt is at hand as
	# root (CI), skipped with a message elsewhere.
	-command -v dciodvfy >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q dicom3tools >/dev/null 2>&1; } || echo "dciodvfy not installed: the DICOM validator test will be skipped"
	touch $(TEST_STAMP)

setup: $(STAMP)

test-setup: $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m DiffusionCore demo

# Test files run in parallel (pytest-xdist; one file per worker at a time, so module fixtures are built once);
# TEST_WORKERS=0 runs them in this process. The 20 slowest tests are listed at the end.
TEST_WORKERS ?= auto
test: $(TEST_STAMP)
	$(PY) -m ruff check DiffusionCore Testing benchmarks scripts CTDiffusionSR XrayToCT
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 Testing

lint: $(STAMP)
	$(PY) -m ruff check DiffusionCore Testing benchmarks scripts CTDiffusionSR XrayToCT

format: $(STAMP)
	$(PY) -m ruff format DiffusionCore Testing benchmarks scripts CTDiffusionSR XrayToCT

clean-venv:
	rm -rf $(VENV)
