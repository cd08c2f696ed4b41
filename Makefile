# Everything runs from ./.venv, created and filled on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export CNNPIPE_HOME ?= $(CURDIR)/.cnnpipe

.PHONY: install demo stop test test-fast bench-ingest bench-train bench-recipe bench-classify bench-views bench-monitor clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@

# The demo runs first, on Prefect's ephemeral API over the database the server then opens: a
# running server's services halved the demo's training speed on 2 cores. The server stays up
# afterwards to show the runs: `make stop` stops it.
demo: install
	PREFECT_HOME=$${PREFECT_HOME:-$(CNNPIPE_HOME)/prefect} $(VENV)/bin/cnnpipe demo
	$(VENV)/bin/cnnpipe server start

stop:
	$(VENV)/bin/cnnpipe server stop

# Two workers, one a core (tests/conftest.py gives each torch one thread: two trainings at two
# threads each on two cores ran several times slower than one after the other), and the session's
# trained models built once for both (built_once). The few `serial` tests run alone afterwards.
test: install
	$(PY) -m pytest -n 2 --dist loadgroup -m "not serial"
	$(PY) -m pytest -m serial

test-fast: install
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow and not crash and not serial"

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

bench-monitor: install
	$(PY) bench/monitor.py

# bench/gpu.sh's wheelhouse: what the GPU box (Python 3.12 on x86-64 Linux, with torch, torchvision,
# pyarrow and numpy alone) lacks to run it, at this venv's versions, and CIFAR-10, since ../shared
# does not travel. Rebuilt from empty: two versions of one package would stop the install there.
GPU_WHEELS := simplejpeg pillow psutil fsspec duckdb pytest pytest-timeout pluggy iniconfig packaging pygments
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64

.PHONY: gpu-wheels
gpu-wheels: install
	rm -rf .whl && mkdir .whl
	freeze="$$($(PY) -m pip freeze)" && for name in $(GPU_WHEELS); do \
	  echo "$$freeze" | grep -i "^$$name==" || { echo "gpu-wheels: $$name is not installed in $(VENV)" >&2; exit 1; }; \
	done >.whl/requirements.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl -r .whl/requirements.txt
	cifar=$${CNNPIPE_SHARED:-../shared}/data/cifar10-jpeg.tar.gz; if [ -f "$$cifar" ]; then cp "$$cifar" .whl/; fi

clean:
	-test -x $(VENV)/bin/cnnpipe && $(VENV)/bin/cnnpipe server stop
	rm -rf .cnnpipe .pytest_cache
