"""results.json, report.md and PNG plots for ``lorakit compare``."""
