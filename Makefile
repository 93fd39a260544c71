# make bench / make test / make lint: each sets up .venv on first use (pinned requirements),
# builds the extension into the source tree (ninja: a second call rebuilds nothing), and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/include/fusedclip/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
export MAX_JOBS ?= 2

.PHONY: test test-oldest oldest-tree bench demo lint build clean gpu-check gpu-check-dry-run

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	FUSEDCLIP_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# What the build depends on besides the sources and the venv, rewritten (at parse time, so that
# make -n sees it too) only when it changes: a new toolkit, arch list or switch rebuilds.
BUILD_SETTINGS := CUDA_HOME=$(CUDA_HOME) CUDA_PATH=$(CUDA_PATH) nvcc=$(shell command -v nvcc) \
	TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) FUSEDCLIP_SKIP_CUDA=$(FUSEDCLIP_SKIP_CUDA) \
	FUSEDCLIP_SKIP_EXT=$(FUSEDCLIP_SKIP_EXT) FUSEDCLIP_REQUIRE_CUDA=$(FUSEDCLIP_REQUIRE_CUDA)
$(shell mkdir -p build && (echo '$(BUILD_SETTINGS)' | cmp -s - build/.settings || echo '$(BUILD_SETTINGS)' > build/.settings))
# torch reinstalled (another version) rewrites its version.py.
TORCH_VERSION_FILE := $(wildcard $(VENV)/lib/python3*/site-packages/torch/version.py)

build/.extension: $(VENV)/.deps $(SOURCES) build/.settings $(TORCH_VERSION_FILE)
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

build: build/.extension

test: build
	$(PY) -m pytest -q tests

# The suite against the oldest torch and triton supported (requirements-oldest.txt), in a venv
# and a copy of the tree of their own under build/oldest, so that neither build replaces the
# other's extension. CPU kernels only: CI compiles the CUDA ones against the pinned torch. The
# integrations' frameworks are not installed there, so their tests skip.
OLDEST := build/oldest
test-oldest: oldest-tree
	test -x $(OLDEST)/venv/bin/python || python3 -m venv $(OLDEST)/venv
	$(OLDEST)/venv/bin/python -m pip install -q -r requirements-oldest.txt
	cd $(OLDEST)/tree && FUSEDCLIP_SKIP_CUDA=1 FUSEDCLIP_REQUIRE_CUDA=0 ../venv/bin/python setup.py -q build_ext --inplace
	cd $(OLDEST)/tree && ../venv/bin/python -m pytest -q -p no:cacheprovider tests

# The copy: a git checkout's files (tracked or not, unless ignored); an unpacked sdist, which has
# no .git of its own, all but its build outputs.
oldest-tree:
	rm -rf $(OLDEST)/tree && mkdir -p $(OLDEST)/tree
	if [ "$$(git rev-parse --show-toplevel 2>/dev/null)" = "$(CURDIR)" ]; then \
		git ls-files -z --cached --others --exclude-standard \
			| tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(OLDEST)/tree; \
	else \
		tar --exclude=./build --exclude=./$(VENV) --exclude='*.so' --exclude='*.pyc' \
			--exclude=./fusedclip/_build.json -cf - . | tar -xf - -C $(OLDEST)/tree; \
	fi

bench: build
	$(PY) -m bench

demo: build
	$(PY) -m bench.stability

# One command for a short GPU loan (at most 9 minutes): build for sm_90 with every core, the CUDA
# tests, compute-sanitizer, the GPU bench and host profiles, a one-screen summary; logs and results
# go to $$FUSEDCLIP_GPU_CHECK_DIR (default bench/results/gpu-<device>-<commit>/). No venv, no
# network: it runs with the machine's own python3 (GPU_PYTHON), or .venv's where there is one.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

gpu-check-dry-run:
	$(GPU_PYTHON) -m bench.gpu_check --dry-run

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check fusedclip tests bench
	$(VENV)/bin/ruff format --check fusedclip tests bench
	$(VENV)/bin/clang-format --dry-run --Werror $(wildcard csrc/*.cpp csrc/include/fusedclip/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

clean:
	rm -rf build fusedclip/_C*.so fusedclip/_build.json
