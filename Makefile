# Two commands do all set-up on a fresh machine:
#   make run    stream the default source through streammem and write outputs/ (and a generated clip)
#   make test   run the test suite
# Both create .venv, install a CPU build of PyTorch when none is there, and install streammem.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.streammem-installed
# PyTorch release installed when the venv has none. Set TORCH_INDEX to PyTorch's CPU wheel
# index on machines where the default registry would hand out a large CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=
# test processes (pytest-xdist; each test file runs whole in one of them)
TEST_WORKERS  ?= auto

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || \
	  $(BIN)/python -m pip install -q torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/streammem run --out outputs
	$(BIN)/streammem generate --scene 0 --frames 16 --out outputs/generate --no-progress

test: $(STAMP)
	@bash scripts/system_deps.sh
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) outputs .pytest_cache build *.egg-info
