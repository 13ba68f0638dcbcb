# med3dvlm developer commands. Run inside a virtual environment (see README).
PYTHON ?= python
# torch first: 2.13.0 resolves to a small CPU build on the project's CI machines; on a GPU machine
# use e.g. `make install TORCH_SPEC="torch==2.5.1"` (any 2.3+ release works).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,offline-models
PYTEST ?= $(PYTHON) -m pytest

.PHONY: install test test-slow test-all phantoms clean help

help:
	@echo "make install    install torch ($(TORCH_SPEC)) and med3dvlm[$(EXTRAS)] in editable mode"
	@echo "make test       fast test suite (< 15 min on 2 CPU cores); slow tests skipped"
	@echo "make test-slow  only the slow tests (long end-to-end runs)"
	@echo "make phantoms   write the embedded phantom dataset to data/phantoms"

install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"

test:
	$(PYTEST) -q -m "not slow"

test-slow:
	$(PYTEST) -q -m slow

test-all:
	$(PYTEST) -q

phantoms:
	$(PYTHON) -m med3dvlm.data.phantoms --root data/phantoms

clean:
	rm -rf outputs multirun logs .pytest_cache build dist *.egg-info
