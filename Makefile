# make demo         installs everything and runs the main job in a temporary directory
# make test         installs everything, then lint, types and the test suite
# make bench        installs everything and runs the benchmarks (figures beside their anchors)
# make install-bin  puts snapvol on PATH with man pages, shell completion, the fstab mount
#                   helper and the systemd unit (as root: /usr/local, /sbin; else ~/.local;
#                   PREFIX=DIR to choose); make uninstall-bin removes them
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-bin uninstall-bin demo test lint typecheck pytest bench long clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/install-system.sh src/snapvol/layout/_blocksum.c
	bash scripts/install-system.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)
	@echo "snapvol is $(CURDIR)/$(BIN)/snapvol; 'make install-bin' puts it on PATH"

install-bin: install
	$(BIN)/python scripts/install_bin.py $(if $(PREFIX),--prefix $(PREFIX))

uninstall-bin: install
	$(BIN)/python scripts/install_bin.py --uninstall $(if $(PREFIX),--prefix $(PREFIX))

demo: install
	bash scripts/demo.sh

lint: install
	$(BIN)/ruff check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

long: install
	$(BIN)/pytest -q -m long

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
