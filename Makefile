VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

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

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(PY) -m jobs.demo

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
