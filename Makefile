PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo's testbed: make demo TESTBED=ltx-textures
TESTBED ?= latte-shapes

.PHONY: demo test test-all lint venv clean

$(STAMP): pyproject.toml constraints-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-dev.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/adacache-compile demo --out demo_out --testbed $(TESTBED)

lint: $(STAMP)
	$(BIN)/ruff check adacache_compile tests examples benchmarks
	$(BIN)/ruff format --check adacache_compile tests examples benchmarks

# --dist loadscope: a module's tests share one worker, so a module-scoped fixture (a capture, an export) is built once.
test: $(STAMP) lint
	$(BIN)/pytest -q -n 2 --dist loadscope -m "not gpu and not tensorrt and not slow"

# Also the tests marked slow (benchmark scripts' smoke runs, second families and testbeds of a covered path).
test-all: $(STAMP) lint
	$(BIN)/pytest -q -n 2 --dist loadscope -m "not gpu and not tensorrt"

clean:
	rm -rf $(VENV) demo_out .pytest_cache
