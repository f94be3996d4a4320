# One command per job; each does its own set-up on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.cache/go/bin
GRPCURL_VERSION ?= v1.9.4
BUF_VERSION ?= v1.75.0
GHZ_VERSION ?= v0.93.0
PROTOS := $(wildcard protos/viewevents/v1/*.proto)
STUBS := viewevents/v1/__init__.py
export PATH := $(TOOLS):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install protos tools constraints kafka-up kafka-down run demo test test-unit bench profile eval lint clean compose-check chaos soak

# The virtualenv (within the versions of constraints.txt) and the generated stubs.
install: $(VENV)/.installed $(STUBS)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# After a deliberate upgrade: install the newest allowed versions, run the suite, then commit this.
constraints:
	$(PY) -m pip install -q --upgrade -e '.[dev]'
	(echo "# Versions the suite last passed with; \`make install\` installs within them (pip -c)."; \
	 echo "# Regenerate after a deliberate upgrade: make constraints"; \
	 $(PY) -m pip freeze --exclude-editable | grep -v '^viewevents') > constraints.txt

protos: $(STUBS)

# Stubs are generated into the shared package (viewevents/v1), never edited by hand.
$(STUBS): $(PROTOS) $(VENV)/.installed
	rm -rf viewevents/v1 && mkdir -p viewevents/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	echo '"""Generated from protos/viewevents/v1 by `make protos`; do not edit."""' > $@

# The real gRPC command-line client, the protobuf linter and the gRPC load tester.
tools: $(TOOLS)/grpcurl $(TOOLS)/buf $(TOOLS)/ghz

$(TOOLS)/grpcurl:
	GOBIN=$(TOOLS) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)
$(TOOLS)/buf:
	GOBIN=$(TOOLS) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(TOOLS)/ghz:
	GOBIN=$(TOOLS) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

kafka-up:
	deploy/kafka.sh start

kafka-down:
	deploy/kafka.sh stop

# Starts Kafka and the three services in the foreground; Ctrl-C stops them all, Kafka too.
run: install tools
	$(PY) -m viewevents_tools.dev_stack --start-kafka

demo: install kafka-up
	$(PY) -m viewevents_tools.demo

# The whole suite. Integration tests start (or reuse) their own broker on port 19092 and use the
# real grpcurl; unit tests need neither.
test: install $(TOOLS)/grpcurl
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q tests/unit

bench: install tools kafka-up
	$(PY) -m benchmarks

# py-spy on each service under its bench section; prints the top frames (PROFILE_ARGS: e.g.
# --only stats --stats-events 500000). Needs root or CAP_SYS_PTRACE.
profile: install kafka-up
	$(PY) -m benchmarks.profile $(PROFILE_ARGS)

eval: install
	$(PY) -m evaluation.recommender

# Fault drills, outside `make test`: each starts its own broker and services on free ports (data
# under .data/drills/), prints a table and exits non-zero when the bar is missed. Flags: ARGS="...".
chaos: install
	$(PY) -m drills.chaos $(ARGS)

soak: install
	$(PY) -m drills.soak $(ARGS)

# The Docker deployment end to end, throw-away, on the engine `docker` talks to: build, healthy,
# upload over TLS with a token, answers checked against the file, restart, down -v.
compose-check: install
	deploy/compose-check.sh

# The protos (buf, STANDARD rules), Python lint and formatting (ruff), types (mypy).
lint: install $(TOOLS)/buf
	$(TOOLS)/buf lint protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	deploy/kafka.sh stop || true
	rm -rf $(VENV) .cache .data viewevents/v1 *.egg-info
