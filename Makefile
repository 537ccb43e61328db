# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SPEC ?= specs/m3-tiny.yaml

.PHONY: setup build test test-fast lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned exactly: the CPU build on this machine; anything looser pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,trt-rtx]'
	# TensorRT-RTX's parser dlopens libtensorrt_rtx.so, the wheel ships only .so.1: a private link
	# directory inside the venv (m3export/export/trt/rtx.py puts it on the engine builder's loader path).
	$(PY) -c "from m3export.export.trt.rtx import loader_dir; print('TensorRT-RTX loader dir:', loader_dir())"
	# transformers' M3 image processor (the preprocessing oracle) needs torchvision; the PyPI wheel
	# cannot load beside the CPU torch, so it lives outside the venv's site-packages and only the
	# oracle subprocess in tests/test_preprocess.py puts it on its path.
	$(PY) -m pip install -q --no-deps --target $(VENV)/torchvision-oracle torchvision==0.28.0
	touch $(STAMP)

setup: $(STAMP)

## The main job on the built-in tiny spec: build, export, check parity after every step.
build: $(STAMP)
	$(VENV)/bin/m3export build $(SPEC)

## The whole test suite, then the CI parity gate on a fresh tiny build (what CI runs: .ci/run).
test: $(STAMP)
	$(PY) -m pytest -q -n 2
	$(VENV)/bin/m3export build $(SPEC) --out artifacts/ci/m3-tiny
	$(VENV)/bin/m3export check artifacts/ci/m3-tiny --report artifacts/ci/check.json

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check m3export tests bench
	$(VENV)/bin/ruff format --check m3export tests bench
	$(VENV)/bin/mypy m3export
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format m3export tests bench
	$(VENV)/bin/ruff check --fix m3export tests bench

bench: $(STAMP)
	$(PY) bench/forward_latency.py
	$(PY) bench/build_bench.py

clean:
	rm -rf $(VENV) artifacts/* .pytest_cache .ruff_cache .mypy_cache
