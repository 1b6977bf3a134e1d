"""Loss-curve PNG for the evaluation report: pretraining and fine-tuning side by side.

Curves are the ``curve.json`` lists the training loop records (points with ``step`` and
``train_loss`` or ``val_loss``). matplotlib runs on the Agg backend: no display is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: containers and CI have no display
import matplotlib.pyplot as plt


def read_curve(path: Path) -> list[dict]:
    """Points of a ``curve.json`` (a list, or ``{"curve": [...]}``); empty when the file is absent."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    points = data.get("curve", []) if isinstance(data, dict) else data
    return [p for p in points if isinstance(p, dict) and "step" in p]


def _series(points: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(p["step"], p[key]) for p in points if p.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "loss curves") -> Path:
    """One panel per named curve (train and validation loss vs step), saved as a PNG."""
    names = list(curves) or ["(no curves)"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = curves.get(name, [])
        for key, style in (("train_loss", "-"), ("val_loss", "o--")):
            steps, values = _series(points, key)
            if steps:
                ax.plot(steps, values, style, label=key.replace("_", " "), markersize=4)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
