"""Reports and figures of the application: ``lorakit compare`` (markdown.py: report.md; plots.py:
the PNGs), ``lorakit analyze`` (analysis.py) and ``lorakit lorahub`` (lorahub.py). matplotlib loads on
the first figure (lorakit.plotting.pyplot)."""
