# The two commands a new user needs (README.md):
#   make demo   # set up, then run the whole pipeline on the embedded synthetic data (CPU)
#   make test   # set up, then run the test suite
# `make setup` is idempotent: it re-installs only when pyproject.toml changes.

PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-stamp
TORCH   ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(VPY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(VPY))
export TORCH_EXTENSIONS_DIR ?= $(abspath .cache/torch_extensions)
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast test-faults lint bench clean java-check etl-env

setup: java-check $(STAMP)

java-check:
	@command -v java >/dev/null 2>&1 || { echo "ERROR: Java not found. Spark 4 needs Java 17+: install it (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless) and retry."; exit 1; }
	@v=$$(java -version 2>&1 | head -n1 | sed -E 's/.*version "([0-9]+).*/\1/'); \
	 if [ "$$v" -lt 17 ] 2>/dev/null; then echo "ERROR: Java $$v found; Spark 4 needs Java 17+ (apt-get install -y openjdk-17-jre-headless)."; exit 1; fi

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[etl,train,test]" "$(TORCH)"
	@touch $(STAMP)

# The Spark executors' side of the ETL (README "Running on your own data and cluster"):
# dist/etl-env.tar.gz (base + etl extra, no torch; for --archives, cached per pyproject.toml
# in .cache/etl-env) and dist/higr_dist.zip (this checkout's code, for --py-files).
# ETL_PYTHON: the interpreter the environment links to (same path on every executor).
etl-env: setup
	$(VPY) etl/pack_env.py --out dist $(if $(ETL_PYTHON),--python $(ETL_PYTHON))

demo: setup
	$(VENV)/bin/higr run --config tiny --name demo

test: setup
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest -q --durations=15 tests

# the inner loop: unit tests only (no JVM, no multi-process jobs, no end-to-end runs)
test-fast: setup
	$(VPY) -m pytest -q -m "not spark and not dist and not slow and not cluster and not multinode and not faults" tests

# the whole fault-injection suite (docs/RELIABILITY.md); `make test` runs its ci subset
test-faults: setup
	$(VPY) -m pytest -q -m faults tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VPY) bench/etl.py && $(VPY) bench/engine.py && $(VPY) bench/decode.py

clean:
	rm -rf runs .pytest_cache .ruff_cache spark-warehouse
