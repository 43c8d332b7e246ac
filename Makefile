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

test: setup lint validate-deploy
	$(CARGO) test --workspace

# Renders deploy/'s kustomizations and validates every object (no cluster needed).
.PHONY: validate-deploy
validate-deploy: $(VENV_STAMP)
	bash scripts/validate-deploy.sh

# The main job on embedded defaults: a local coordinator and 2 workers train the small model on
# a generated dataset, on CPU with TCP collectives (a fresh job each time; the data is kept).
demo: setup
	rm -rf runs/demo/coordinator runs/demo/checkpoints
	./target/debug/albef run --config configs/small.yaml --workers 2 --set job.run_dir=runs/demo

clean-runs:
	rm -rf runs
