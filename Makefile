# Everything runs from ./.venv, created and filled on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export CNNPIPE_HOME ?= $(CURDIR)/.cnnpipe

.PHONY: install demo stop test test-fast bench-ingest bench-train bench-recipe bench-classify bench-views clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@

# The demo runs on the background server, which stays up afterwards to show it: `make stop` stops it.
demo: install
	$(VENV)/bin/cnnpipe server start
	$(VENV)/bin/cnnpipe demo

stop:
	$(VENV)/bin/cnnpipe server stop

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not crash"

bench-ingest: install
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/ingest.py

bench-train: install
	$(PY) bench/train.py --device cpu

bench-recipe: install
	$(PY) bench/recipe.py --device cpu

bench-classify: install
	$(PY) bench/classify.py --device cpu

bench-views: install
	$(PY) bench/views.py

clean:
	-test -x $(VENV)/bin/cnnpipe && $(VENV)/bin/cnnpipe server stop
	rm -rf .cnnpipe .pytest_cache
