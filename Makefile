# Quick start: `make demo`, then `make test`. Every target sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STATE  := .local
LIBS   := $(STATE)/kafka/libs
STAMP  := $(VENV)/.installed
JARS   := $(LIBS)/.fetched
PYTEST_ARGS ?=

.PHONY: setup demo test unit integration bench up down status lint clean

# pip's build chatter goes to a log, shown only when the install fails.
$(STAMP): pyproject.toml schemas/_speedups.c
	$(PYTHON) -m venv $(VENV)
	@echo "installing Python packages into $(VENV) (log: $(VENV)/pip.log)"
	@{ $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -e '.[dev]'; } > $(VENV)/pip.log 2>&1 \
		|| { tail -40 $(VENV)/pip.log; exit 1; }
	touch $@

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
test: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

# Every stage beside its baseline on a private stack (free ports, temp dir); the result
# appends to benchmarks/results/bench.jsonl. BENCH_ARGS, e.g. "--stages worker,latency --json".
bench: setup
	$(BIN)/feedback bench $(BENCH_ARGS)

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
