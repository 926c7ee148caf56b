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
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

# Two pytest workers share the CI machine's 2 cores for the tests that run in one Ray; each worker takes whole
# files (loadfile), so a module's fixtures are built once. The slow ones (their own clusters, killed jobs,
# wall-time bounds) run after, one at a time: beside another worker's Ray, Ray's fixed 30 s for a node to
# register ran out and a drill overran its bound.
test: $(STAMP) lint browser
	$(VENV)/bin/pytest -q -n 2 --dist loadfile -m "not slow" --durations=15
	$(VENV)/bin/pytest -q -m slow --durations=25

demo: $(STAMP)
	$(PY) -m jobs.demo

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
