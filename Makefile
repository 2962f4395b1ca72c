# `make demo` and `make test` work on a fresh machine: they build .venv first.
# torch is pinned and installed FIRST: an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.unetkit-installed
PYTEST_WORKERS ?= 2

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,test]"
	touch $(STAMP)

# make demo            -> built-in default (seeded SD1.5-architecture LCM UNet, random weights)
# make demo CKPT=x.safetensors -> the same steps on your own file
demo: $(STAMP)
	$(PY) -m unetkit.demo $(if $(CKPT),$(CKPT),) --out demo_out

# the whole gate, as CI runs it: lint and format check, types, the import floors, the test suite
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests

# make bench                          -> every benchmarks/bench_<subject>.py, figures in BENCHMARKS.md (about 60 min)
# make bench ONLY="startup convert_load" -> some of them, by subject
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(if $(ONLY),--only $(ONLY),)

clean:
	rm -rf demo_out .pytest_cache build *.egg-info src/*.egg-info
