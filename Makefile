# make bench / make test / make lint: each sets up .venv on first use (pinned requirements),
# builds the extension into the source tree (ninja: a second call rebuilds nothing), and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/include/fusedclip/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
export MAX_JOBS ?= 2

.PHONY: test bench demo lint build clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	FUSEDCLIP_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build/.extension: $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

build: build/.extension

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m bench

demo: build
	$(PY) -m bench.stability

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check fusedclip tests bench
	$(VENV)/bin/ruff format --check fusedclip tests bench
	$(VENV)/bin/clang-format --dry-run --Werror $(wildcard csrc/*.cpp csrc/include/fusedclip/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

clean:
	rm -rf build fusedclip/_C*.so
