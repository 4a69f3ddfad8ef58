"""The application's experiments: one training run end to end (run.py: task + method -> files) and
the comparison of methods on one task (compare.py: one process per method, then the report).
Above tasks/ and report/, below the command line (cli/)."""
