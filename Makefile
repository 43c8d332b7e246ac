# One entry point: `make setup`, `make test`, `make demo`. Every target is idempotent.
SHELL := /bin/bash
VENV_STAMP := .venv/.setup-done
TORCH_STAMP := .venv/.torch-done
CARGO ?= cargo

.PHONY: setup build build-demo test lint demo clean-runs bench-coordinator bench bench-data

setup: $(VENV_STAMP) build

# Re-run the Python setup when its inputs change (or the venv is gone). The binaries need only
# torch (its libtorch); the tests need the rest too.
$(TORCH_STAMP): scripts/requirements.txt scripts/setup-venv.sh
	bash scripts/setup-venv.sh torch
	touch $@

$(VENV_STAMP): $(TORCH_STAMP)
	bash scripts/setup-venv.sh all
	touch $@

build: $(VENV_STAMP)
	@echo "setup: building the workspace with every test, bench and example (the first time takes a while on 2 cores)"
	$(CARGO) build --workspace --all-targets

# Only the three binaries the demo runs, in the dev profile (dependencies optimised, our crates
# not: the fastest build + run; see README "The demo"). The first time, torch downloads while
# cargo compiles: a first pass builds all that does not need libtorch (it goes on past torch-sys,
# which fails while torch is not there yet; only its progress lines are shown), the second the rest.
DEMO_BINS := -p albef -p albef-coordinator -p albef-worker --bins
build-demo:
	@bash scripts/setup-venv.sh system
	@if $(MAKE) -s -q $(TORCH_STAMP); then $(CARGO) build $(DEMO_BINS); else \
	  echo "setup: installing torch into .venv while cargo builds albef, albef-coordinator and albef-worker (the first time takes several minutes on 2 cores)"; \
	  $(MAKE) --no-print-directory $(TORCH_STAMP) & pip=$$!; \
	  $(CARGO) build --keep-going $(DEMO_BINS) 2>&1 | grep --line-buffered -E '^ +(Compiling|Finished)'; \
	  wait $$pip || exit 1; \
	  echo "setup: torch is installed; building what links libtorch"; \
	  $(CARGO) build $(DEMO_BINS); \
	fi

lint: $(VENV_STAMP)
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test binary runs even when one fails, and every failure is reported.
test: setup lint validate-deploy
	$(CARGO) test --workspace --no-fail-fast

# Renders deploy/'s kustomizations and validates every object (no cluster needed).
.PHONY: validate-deploy
validate-deploy: $(VENV_STAMP)
	bash scripts/validate-deploy.sh

# The main job on embedded defaults: generate a dataset (train + held-out retrieval split), train
# with a local coordinator and 2 workers (CPU, TCP collectives, checkpoints in
# runs/demo/checkpoints, a retrieval evaluation every 500 steps), evaluate the untrained model the
# job started from (the same seed) and the final checkpoint, and print both tables side by side
# (training first: the first step comes sooner); the loss curves are in
# runs/demo/loss.png. A fresh run each time. k_test 16 of the split's 200 images re-ranks about
# the share the reference's 128 of Flickr30K's 1000 does.
DEMO := runs/demo
DEMO_K := 16
demo: build-demo
	rm -rf $(DEMO)
	./target/debug/albef run --config configs/small.yaml --workers 2 --set job.run_dir=$(DEMO) --set job.eval_every=500 --set job.eval_k_test=$(DEMO_K)
	./target/debug/albef eval --untrained --config configs/small.yaml --set job.run_dir=$(DEMO) --k-test $(DEMO_K) --out $(DEMO)/eval/untrained.json
	./target/debug/albef eval --checkpoint $(DEMO) --k-test $(DEMO_K) --out $(DEMO)/eval/trained.json --compare $(DEMO)/eval/untrained.json
	@echo "loss curves: $(DEMO)/loss.png; reports: $(DEMO)/eval/"

clean-runs:
	rm -rf runs

# The coordinator (release build) under 100, 1,000 and 10,000 simulated workers on 127.0.0.1:
# rendezvous time, heartbeat latency, errors, CPU, memory and state writes (about 3 minutes).
FLEET ?= 100,1000,10000
bench-coordinator:
	@bash scripts/setup-venv.sh system
	$(CARGO) bench -p albef-coordinator --bench fleet -- --workers $(FLEET)

# The training step against the same step in eager PyTorch (tests/python/torch_step.py, reference
# and best modes), on the CPU, same shapes and threads, interleaved rounds: prints torch / ours.
bench: $(VENV_STAMP)
	$(CARGO) build -p albef --bins
	bash scripts/bench-step.sh

# `albef data prepare` against img2dataset's resizer (read, decode, resize, JPEG re-encode) on the
# same JPEGs and settings, one core each, both resize modes: prints ours / img2dataset's images/s.
# img2dataset gets a venv of its own: its dependencies (wandb, pyarrow, protobuf) are not the tests'.
BENCH_DATA_VENV := target/bench-data/venv
bench-data:
	@test -x $(BENCH_DATA_VENV)/bin/python || python3 -m venv $(BENCH_DATA_VENV)
	$(BENCH_DATA_VENV)/bin/python -m pip install -q --disable-pip-version-check img2dataset==1.47.0
	$(CARGO) bench -p albef-data --bench prepare
