"""PNG plots of results a person would rather look at than read (loss curves, nightly trends)."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from pathlib import Path

from gemstill.fsutil import atomic_write_bytes


def save_figure(path: Path, figure) -> Path:
    """Lay out a matplotlib figure, write it atomically as a PNG and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def save_loss_curve(path: Path, history: Sequence[dict[str, float]], title: str, key: str = "loss") -> Path:
    """Loss against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    axes.plot([h["step"] for h in history], [h[key] for h in history], linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel(key)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return save_figure(path, figure)


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def embed_images(markdown: str, directory: Path) -> str:
    """The markdown with every `![alt](file.png)` whose file exists (relative to `directory`, or absolute) as a
    base64 data URI, so it shows where the store's files cannot be reached (a Prefect UI artifact)."""

    def inline(match: re.Match[str]) -> str:
        path = Path(match.group(2))
        path = path if path.is_absolute() else Path(directory) / path
        if not path.is_file():
            return match.group(0)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{match.group(1)}](data:image/png;base64,{encoded})"

    return _IMAGE_LINK.sub(inline, markdown)
