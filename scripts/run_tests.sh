#!/usr/bin/env bash
# Runs the test suite. pytest exits 5 when it collected no test: that means the suite went missing,
# which must fail loudly rather than pass as "nothing failed".
PY=${1:-.venv/bin/python}
LORAKIT_NO_SKIPS=1 "$PY" -m pytest tests -p no:cacheprovider --durations=8
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: the suite is missing or all files failed to import" >&2
    exit 1
fi
exit "$status"
