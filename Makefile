# One entry point: `make setup`, `make test`, `make demo`. Every target is idempotent.
SHELL := /bin/bash
VENV_STAMP := .venv/.setup-done
CARGO ?= cargo

.PHONY: setup build test lint demo clean-runs

setup: $(VENV_STAMP) build

# Re-run the Python setup when its inputs change (or the venv is gone).
$(VENV_STAMP): scripts/requirements.txt scripts/setup-venv.sh
	bash scripts/setup-venv.sh
	touch $@

build: $(VENV_STAMP)
	$(CARGO) build --workspace --all-targets

lint: $(VENV_STAMP)
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: setup lint
	$(CARGO) test --workspace

# The main job on embedded defaults: the small model on generated pairs, on CPU.
demo: setup
	$(CARGO) run -q -p albef -- train --config configs/small.yaml --out runs/demo

clean-runs:
	rm -rf runs
