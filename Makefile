# Quick start: 'make demo' trains CR-SAM on MNIST-1D and certifies the checkpoint;
# 'make test' runs the test suite. Both create .venv and install what they need.
#
# The CPU build of torch is installed before crsam, so that pip keeps it and does not pull the
# much larger CUDA build. Elsewhere, pick another build, for example:
#   make demo TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
DEMO_DIR ?= runs/demo
# Monte-Carlo weight samples of the demo's certificate, fewer than crsam bound's default of
# 10000 so that the demo stays within minutes on two cores; the bound is then a little looser.
DEMO_MC_SAMPLES ?= 2000
# Threads of the demo's torch. One thread was faster than the default for these small models,
# far faster on cores shared with other jobs: 0.1 s against 6.8 s per MLP epoch at load 5.
DEMO_THREADS ?= 1

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test install clean

# The virtual environment with torch installed first; the stamp records that it is complete.
$(BIN)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	touch $@

# crsam itself, editable, reinstalled when its packaging changes.
$(BIN)/.crsam-installed: $(BIN)/.torch-installed pyproject.toml
	$(PIP) install -e .
	touch $@

# crsam with the test extra (pytest, hypothesis).
$(BIN)/.crsam-test-installed: $(BIN)/.torch-installed pyproject.toml
	$(PIP) install -e ".[test]"
	touch $@

install: $(BIN)/.crsam-installed

demo: $(BIN)/.crsam-installed
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/crsam train --data mnist1d --model mlp --optimizer crsam --out $(DEMO_DIR) --overwrite
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/crsam bound $(DEMO_DIR)/checkpoint.pt --mc-samples $(DEMO_MC_SAMPLES)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/crsam curvature $(DEMO_DIR)/checkpoint.pt

# curvlinops, the independent Hessian for one cross-check test, installed without its
# dependencies: backpack-for-pytorch asks for torchvision, which does not import beside the CPU
# torch and could make pip replace torch. The code paths the test uses need no torchvision.
CROSSCHECK_PACKAGES := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einops==0.8.2 \
	einconv==0.1.0 linear_operator==0.6.1 opt-einsum==3.4.0 unfoldNd==0.2.3 jaxtyping==0.3.11

$(BIN)/.crosscheck-installed: $(BIN)/.crsam-test-installed
	$(PIP) install --no-deps $(CROSSCHECK_PACKAGES)
	touch $@

test: $(BIN)/.crsam-test-installed $(BIN)/.crosscheck-installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(DEMO_DIR)
