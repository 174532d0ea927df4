# Quick start on a fresh machine: `make bench` (set up, build, run the benchmark suite) and `make test`.
# Set-up: a virtual environment in .venv with torch==2.14.1 (CUDA 13.0 build; runs on CPU too), then the extension
# is built in place (C++ always; CUDA when torch has CUDA and nvcc is found; PSPNET_FAST_SKIP_CUDA=1 skips it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
SHELL := /bin/bash
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

# The peers (segmentation_models_pytorch, mmsegmentation + mmcv-lite) for tests/interop/test_peers.py: the pins of
# pyproject's `peers` extra, torch kept at $(TORCH_VERSION) (smp pulls the matching torchvision). ~2 min, ~300 MB
# (scipy, opencv, matplotlib come with mmseg/mmengine).
PEERS := "segmentation-models-pytorch==0.6.0" "mmsegmentation==1.2.2" "mmcv-lite==2.1.0" "mmengine==0.10.7" ftfy regex

.PHONY: setup peers build bench test info clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) ninja numpy pillow pytest pytest-benchmark pybind11 packaging "setuptools>=64" wheel
	$(PY) -m pip install -q onnx onnxscript onnxruntime  # the export extra (.[export]): tests/test_export.py runs
	touch $@

peers: $(VENV)/.peers-done
$(VENV)/.peers-done: $(VENV)/.setup-done
	$(PY) -m pip install -q $(PEERS) torch==$(TORCH_VERSION)
	touch $@

build: $(VENV)/.build-done
$(VENV)/.build-done: $(VENV)/.setup-done $(SOURCES)
	set -o pipefail; $(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(VENV)/build.log \
	  | grep -E "\[pspnet_fast build\]|^ *\[[0-9]+/[0-9]+\]|-shared|error:|Successfully installed" | cut -c1-240
	$(PY) -c "import pspnet_fast._C"
	touch $@

info: build
	$(VENV)/bin/pspnet-fast info

bench: build
	$(VENV)/bin/pspnet-fast info
	$(VENV)/bin/pspnet-fast bench $(BENCH_ARGS)

test: build peers
	$(VENV)/bin/pspnet-fast info
	$(PY) -m pytest -q tests $(TEST_ARGS)

clean:
	rm -rf build *.egg-info pspnet_fast/_C*.so $(VENV)/.build-done
