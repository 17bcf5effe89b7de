# Every target installs what it needs first: apt packages (when missing) and the virtual environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
APT_PACKAGES := postgresql postgresql-contrib pgbackrest redis-server
# The browser test drives Debian's own Chromium (no downloaded browsers).
TEST_APT_PACKAGES := chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: drill test bench up down apt venv clean

drill: apt venv
	$(VENV)/bin/dr drill all

test: APT_PACKAGES += $(TEST_APT_PACKAGES)
test: apt venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --durations=15

bench: apt venv
	$(VENV)/bin/python benchmarks/run.py

up: apt venv
	$(VENV)/bin/dr up

down: venv
	$(VENV)/bin/dr down

apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

clean: down
	rm -rf .sandbox
