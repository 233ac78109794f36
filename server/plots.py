"""PNG plots for run reports (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fedser.common.errors import FedserError


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # device installs may leave plotting out
        raise FedserError("plots need matplotlib: pip install 'fedser[server]' or 'fedser[tools]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, title: str | None = None) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` and free it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                  title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows = true class) with raw counts written in each cell."""
    import numpy as np

    plt = _pyplot()
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(4.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall share")
    return save_figure(fig, path)


def curves_png(rows: Sequence[dict], x: str, panels: Sequence[tuple[str, Sequence[str]]],
               path: str | Path, title: str = "") -> Path:
    """One panel per (ylabel, keys) over ``x``; keys absent from every row are left out."""
    plt = _pyplot()
    panels = [(label, [k for k in keys if any(k in r for r in rows)]) for label, keys in panels]
    panels = [(label, keys) for label, keys in panels if keys] or [("value", [])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (label, keys) in zip(axes[:, 0], panels):
        for k in keys:
            pts = [(r[x], r[k]) for r in rows if k in r and r[k] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=k)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(x)
    return save_figure(fig, path, title)
