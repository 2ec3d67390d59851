# The two commands: `make serve` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test lint bench install clean

# --no-compile: modules are byte-compiled when first imported, so installing skips compiling
# the thousands nobody imports (11 s of a fresh clone's 53 s install on the Intel VM)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev,bench,identity]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/escalation-comms serve

# Lint problems fail the target too, but never hide the test results: pytest always runs,
# and its summary line comes last.
test: $(STAMP)
	@lint=0; $(MAKE) --no-print-directory lint || lint=1; \
	$(BIN)/python -m pytest; tests=$$?; \
	if [ $$lint -ne 0 ]; then echo "make test: lint failed (ruff or mypy, see above)"; fi; \
	[ $$tests -eq 0 ] && [ $$lint -eq 0 ]

# Every check runs, so one report shows all of them; any failure fails the target.
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check gateway plugins tests bench || status=1; \
	$(BIN)/ruff format --check gateway plugins tests bench || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
