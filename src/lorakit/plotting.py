"""matplotlib for lorakit's reports: imported on first use, on the file-only Agg backend, and one way to
write a finished figure. (``lorakit --help`` and library users never import matplotlib.)"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib                  # deferred: heavy optional dependency
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt    # deferred: heavy optional dependency
    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write ``fig`` to ``path`` as an image and free it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
