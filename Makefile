VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean browser

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first: the pinned CPU build lies on local disk; letting a resolver pick torch would fetch CUDA.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Headless Chromium renders the HTML report in its test (Debian's package; CI runs as root in a fresh clone).
INSTALL_BROWSER := command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
browser:
	@$(INSTALL_BROWSER)

# The tests marked alone run first with no other test beside them: a three-node cluster's drills (next to
# another test's Ray, the cluster took minutes to start a job) and long videos decoded with FFmpeg's threads.
# Chromium installs meanwhile (disk and network), its log shown if it fails. Then two pytest workers share
# the CI machine's 2 cores; each takes whole files (loadfile), so a module's fixtures are built once, and the
# longest units go out first (tests/conftest.py) with the short files filling in beside.
test: $(STAMP) lint
	@( $(INSTALL_BROWSER) ) > $(VENV)/browser.log 2>&1 & browser=$$!; \
	$(VENV)/bin/pytest -q -m alone --durations=5; drills=$$?; \
	wait $$browser || { cat $(VENV)/browser.log; exit 1; }; exit $$drills
	$(VENV)/bin/pytest -q -n 2 --dist loadfile -m "not alone" --durations=30

demo: $(STAMP)
	$(PY) -m jobs.demo

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
