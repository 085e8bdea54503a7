"""Small, generic matplotlib helpers (Agg backend): box plots written straight to PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure (closing matters: long runs draw many)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=dpi)
    _plt().close(fig)
    return p


def boxplot(groups: dict[str, np.ndarray], title: str, ylabel: str, path: str | Path) -> Path:
    """One box per group (e.g. train vs test), written to path."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(groups) + 2), 4))
    names = list(groups)
    ax.boxplot([np.asarray(groups[n], float) for n in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def grouped_boxplot(groups: dict[str, dict[str, np.ndarray]], title: str, ylabel: str, path: str | Path) -> Path:
    """Boxes side by side per x label (outer dict = series, e.g. train/test; inner = x labels, e.g. k)."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series = list(groups)
    labels = list(next(iter(groups.values()))) if groups else []
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.5 * len(labels) * len(series) + 2)), 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for s, name in enumerate(series):
        pos = np.arange(len(labels)) + (s - (len(series) - 1) / 2) * width
        bp = ax.boxplot([np.asarray(groups[name][lab], float) for lab in labels], positions=pos, widths=width * 0.9,
                        patch_artist=True, showfliers=False)
        for box in bp["boxes"]:
            box.set_facecolor(colors[s % len(colors)])
            box.set_alpha(0.6)
        ax.plot([], [], color=colors[s % len(colors)], linewidth=8, alpha=0.6, label=name)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)
