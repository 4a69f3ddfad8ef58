#!/usr/bin/env bash
# Line counts of lorakit's core path (the reading order of docs/ARCHITECTURE.md), and of every
# package, as a markdown table. Run from the repository root.
set -eu
cd "$(dirname "$0")/../src/lorakit"
CORE="errors.py config.py peft_names.py module_paths.py layers/*.py modules_to_save.py state.py targeting.py plan.py
      inject.py adapters.py io/*.py"
echo "| core file | lines |"
echo "|---|---:|"
total=0
for f in $CORE; do
    n=$(wc -l < "$f"); total=$((total + n))
    echo "| \`$f\` | $n |"
done
echo "| **core total** | **$total** |"
echo
echo "| package | files | lines |"
echo "|---|---:|---:|"
for d in */; do
    d=${d%/}
    [ "$d" = "__pycache__" ] && continue
    files=$(find "$d" -name '*.py' | wc -l)
    lines=$(find "$d" -name '*.py' -exec cat {} + | wc -l)
    echo "| \`$d/\` | $files | $lines |"
done
