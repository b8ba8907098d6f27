# Quick start: `make demo`, then `make test`. Every target sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STATE  := .local
LIBS   := $(STATE)/kafka/libs
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
JARS   := $(LIBS)/.fetched
PYTEST_ARGS ?=

.PHONY: setup demo test test-faults unit integration bench up down status lint clean lock audit test-compat

# Exactly the locked versions, each checked against its hash (pip too: it is in the lock); then
# the project itself, built with the locked setuptools (no build isolation: nothing unlocked is
# fetched). pip's build chatter goes to a log, shown only when the install fails.
$(STAMP): pyproject.toml $(LOCK) schemas/_speedups.c
	$(PYTHON) -m venv $(VENV)
	@echo "installing Python packages into $(VENV) from $(LOCK) (log: $(VENV)/pip.log)"
	@{ $(BIN)/pip install -q --require-hashes -r $(LOCK) \
		&& $(BIN)/pip install -q --no-deps --no-build-isolation -e .; } > $(VENV)/pip.log 2>&1 \
		|| { tail -40 $(VENV)/pip.log; exit 1; }
	touch $@

# After changing a dependency in pyproject.toml: pin every package (and its hashes) for
# Python 3.11 on Linux x86_64. Commit the result; `make setup` then rebuilds the venv from it.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --quiet -o $(LOCK)

# Known vulnerabilities in the locked set (PyPI's advisory data). A finding fails unless
# security/audit-ignore.toml gives its reason; PyPI out of reach fails too (docs/security.md).
# SKIP_AUDIT=1 skips it, saying so (for working offline; CI never sets it).
audit: $(STAMP)
	@if [ -n "$(SKIP_AUDIT)" ]; then echo "make audit: SKIPPED (SKIP_AUDIT is set)" >&2; \
	else $(BIN)/python security/audit.py $(LOCK); fi

# Kafka broker jars from Maven Central (versions pinned in pipeline/kafka/pom.xml).
$(JARS): pipeline/kafka/pom.xml
	rm -rf $(LIBS)
	mvn -q -B -f pipeline/kafka/pom.xml dependency:copy-dependencies \
		-DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(LIBS)
	touch $@

setup: $(STAMP) $(JARS)

demo: setup
	$(BIN)/feedback demo

# pytest exits 5 when it collected nothing: that is a failure here, never a green run.
test: setup audit
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The fault suite (tests/integration/test_faults.py, docs/reliability.md): the worker and the sink
# SIGKILLed under a steady load, every event id reconciled across the stores; test_faults_restarts.py:
# the broker and the embedded ClickHouse SIGKILLed and started again. `make test` runs only
# its fast subset (the tests not marked slow). test_cluster_failover.py: a three-broker cluster losing
# one broker, then two (slow: only here). test_bounded_state.py: 10 minutes at 5,000 events/s, the
# dedup and rate-limit tables stay bounded (slow: only here).
test-faults: setup
	$(BIN)/python -m pytest -m faults tests/integration/test_faults.py tests/integration/test_faults_restarts.py \
		tests/integration/test_cluster_failover.py tests/integration/test_bounded_state.py $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

# Every stage beside its baseline on a private stack (free ports, temp dir); the result
# appends to benchmarks/results/bench.jsonl. BENCH_ARGS, e.g. "--stages worker,latency --json".
bench: setup
	$(BIN)/feedback bench $(BENCH_ARGS)

# clickhouse-connect's own integration suite against the embedded ClickHouse server, nice'd
# (tests/compat/run_clickhouse_connect_suite.py; ~10 min, so not in `make test`). Needs a
# clickhouse-connect checkout in .local/compat/clickhouse-connect (cloned when the network allows).
test-compat: setup
	$(BIN)/python tests/compat/run_clickhouse_connect_suite.py $(COMPAT_ARGS)

up: setup
	$(BIN)/feedback up

down:
	$(BIN)/feedback down

status:
	$(BIN)/feedback status

lint: setup
	$(BIN)/ruff check .

clean:
	-$(BIN)/feedback down
	rm -rf $(VENV) $(STATE) *.egg-info build schemas/*.so
