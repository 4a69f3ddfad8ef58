#!/usr/bin/env bash
# Runs the test suite. pytest exits 5 when it collected no test: that means the suite went missing,
# which must fail loudly rather than pass as "nothing failed".
PY=${1:-.venv/bin/python}
# Tests marked `cuda` need a GPU: without one they are deselected here (`make gpu-check` runs them).
MARKS=()
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: deselecting the tests marked cuda (make gpu-check runs them on a GPU)"
    MARKS=(-m "not cuda")
fi
LORAKIT_NO_SKIPS=1 "$PY" -m pytest tests -p no:cacheprovider --durations=8 "${MARKS[@]}"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: the suite is missing or all files failed to import" >&2
    exit 1
fi
exit "$status"
