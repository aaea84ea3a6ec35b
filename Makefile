# `make demo` and `make test` do all set-up on a fresh machine: a venv with the
# CPU build of torch (pinned here only, so pip never pulls a multi-GB CUDA build).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install demo test fuzz lint bench cross-tools quantizer-paths clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the main job: four optimizers on the small causal-LM recipe (same seed and steps, lr translated
# from AdamW's for each), then report.md with loss / memory / lr plots under runs/demo
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hf-optim compare --optims adamw,adamw_8bit,lion_8bit,lamb --max_steps 40 \
		--adamw_lr 3e-3 --adamw_weight_decay 0.01 --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# the differential suite (tests/test_differential.py) with 20x as many drawn configurations
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 HF_OPTIM_FUZZ=20 $(BIN)/python -m pytest -q tests/test_differential.py

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py

# optional (root, Debian/Ubuntu, ~1 min): an aarch64 cross compiler and qemu-user, so tests/test_vector_paths.py
# and quantizer-paths also check the native quantizer's aarch64 builds (NEON, SVE); skipped where absent
cross-tools:
	apt-get install -y gcc-aarch64-linux-gnu qemu-user

# every vector path of the native quantizer this machine can build (avx512, avx2, portable, aarch64 via qemu)
quantizer-paths: $(STAMP)
	$(BIN)/python benchmarks/quantizer_paths.py

clean:
	rm -rf $(VENV) build *.egg-info
