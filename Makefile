# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pip's own config names the folder with the CPU torch wheel; pass it on explicitly
# so the install works the same under any installer that ignores pip's config.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
PIP_FLAGS  := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),)

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PIP_FLAGS) -e '.[dev]'
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia'; then echo "CUDA wheels crept in: pin torch==2.13.0" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/bidhive serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/bidhive bench clearing

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
