# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install java chromium check test test-fast demo bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "streamfit needs Python 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# Spark needs a Java 17+ runtime, the one thing beyond pip: apt-get installs it when `java` is missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
java:
	@command -v java >/dev/null 2>&1 || { echo "installing a Java runtime for Spark (openjdk-17-jre-headless)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq openjdk-17-jre-headless; }

# the console's browser tests drive Debian's headless Chromium through its chromedriver (nothing is downloaded at test time)
chromium:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { echo "installing Chromium for the console's browser tests (chromium chromium-driver)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# lint, format and types (configured in pyproject.toml); `make test` runs it first, so CI fails on a lint error
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) java chromium check
	$(BIN)/python -m pytest

# the fast tier: in-process tests and the doctests, no broker, Spark or CLI subprocess (tests marked slow are left out)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# the whole pipeline on the embedded broker until Ctrl-C; `make demo DURATION=120` stops by itself
demo: $(STAMP) java
	$(BIN)/streamfit up $(if $(DURATION),--duration $(DURATION))

bench: $(STAMP)
	$(BIN)/python -m bench.produce

clean:
	rm -rf $(VENV) .streamfit .pytest_cache .ruff_cache .mypy_cache
