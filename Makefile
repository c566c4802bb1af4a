# The README's two commands: `make reproduce` (the demo reproduction) and `make test` (the test suite).
# Both create the project virtual environment .venv on first use and reuse it afterwards.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PROFILE ?= demo
ARGS ?=

.PHONY: install reproduce dry-run gpu-check test export clean-nbs lint format
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@# the survey's browser test needs Debian's chromium + chromedriver (installed when missing and run as root)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null; \
	  else echo "note: no chromium/chromedriver: the survey's browser test will be skipped (apt-get install chromium chromium-driver)"; fi; }
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e ".[dev]" -c constraints.txt 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

reproduce: install
	$(VENV)/bin/diffusegen reproduce --profile $(PROFILE) $(ARGS)

# A dry run of a profile (e.g. `make dry-run PROFILE=paper`): its networks and formats with every count cut, into dry-run/.
dry-run: install
	$(VENV)/bin/diffusegen reproduce --profile $(PROFILE) --dry-run $(ARGS)

# On a borrowed GPU (about 14 minutes): the paper dry run on CUDA, the styled pair at the paper's evaluation count and
# the fast sampler at scale, into figures/bench/gpu-<name>/ (e.g. `make gpu-check DATA=data/kvasir-seg`).
DATA ?= data/kvasir-seg
gpu-check: install
	scripts/gpu-check.sh $(DATA)

test: install
	$(VENV)/bin/python -m pytest $(ARGS)

# For developers: regenerate diffusegen/ from nbs/ and strip notebook noise (CI checks both leave no diff).
export: install
	$(VENV)/bin/nbdev-export
clean-nbs: install
	$(VENV)/bin/nbdev-clean
# ruff on the notebooks (the source) and the tests; CI runs `make lint`
lint: install
	$(VENV)/bin/ruff format --check nbs tests
	$(VENV)/bin/ruff check nbs tests
format: install
	$(VENV)/bin/ruff format nbs tests
	$(VENV)/bin/nbdev-export
