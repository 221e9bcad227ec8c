# The README's commands. Everything installs itself on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SEEDS ?= 100000
NODES ?= 5
NODESEEDS ?= 10000
MINUTES ?= 10
FUZZ_SECONDS ?= 60

.PHONY: test demo soak jepsen bench bench-partitions fuzz docs dist deps clean

# Debian's Berkeley DB headers are needed to build the berkeleydb binding.
deps:
	@if [ ! -f /usr/include/db.h ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdb5.3-dev; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdb5.3-dev; fi; \
	fi

$(STAMP): setup.cfg pyproject.toml | deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/kommander demo

# The deterministic simulations over many seeds: the core (SEEDS=, NODES=), then whole nodes
# (NODESEEDS=, half with 3 nodes and half with 5, the base fault profile).
soak: $(STAMP)
	$(PY) -m kommander.testing.sim --seeds $(SEEDS) --nodes $(NODES)
	$(PY) -m kommander.testing.nodesim --seeds $$(( $(NODESEEDS) / 2 )) --nodes 3
	$(PY) -m kommander.testing.nodesim --seeds $$(( $(NODESEEDS) - $(NODESEEDS) / 2 )) --nodes 5

# Real nodes under kill -9, pauses and full crashes, history checked for linearizability.
jepsen: $(STAMP)
	$(PY) -m kommander.testing.jepsen --minutes $(MINUTES) --nodes 3

# Mutated frames into the wire codec and mutated requests into the HTTP API, FUZZ_SECONDS each
# (SEED= to replay a run); a short fixed run is part of `make test` (tests/test_fuzz.py).
fuzz: $(STAMP)
	$(PY) -m kommander.testing.fuzz --seconds $(FUZZ_SECONDS) $(if $(SEED),--seed $(SEED))

# The core alone, the WAL alone, many partitions, then whole clusters against PySyncObj (its line
# comes last).
bench: $(STAMP)
	$(PY) benchmarks/core_bench.py
	$(PY) benchmarks/wal_bench.py --seconds 2
	$(PY) benchmarks/codec_bench.py
	$(PY) benchmarks/partitions_bench.py
	$(PY) benchmarks/cluster_bench.py

# 3 nodes with 1, 64 and 1,024 partitions: cold start, idle CPU, failover, restart (about 90 s).
bench-partitions: $(STAMP)
	$(PY) benchmarks/partitions_bench.py

docs: $(STAMP)
	$(PY) -m pip install -q -e '.[docs]' --config-settings editable_mode=compat
	$(VENV)/bin/sphinx-build -q -W -b html docs docs/_build/html

# A wheel and an sdist in dist/ (the wheel built from the sdist, so the sdist is complete enough
# to build from), then tests/distcheck.py: their contents, and the wheel installed (not editable)
# into a fresh virtualenv, dist/check-venv, with the example plugin of docs/examples beside it.
DIST_PLUGIN ?= docs/examples/kommander-acme
dist: $(STAMP)
	$(PY) -m pip install -q -e '.[dist]' --config-settings editable_mode=compat
	rm -rf dist
	$(PY) -m build -q --outdir dist .
	$(PY) tests/distcheck.py dist --plugin $(DIST_PLUGIN)

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build
