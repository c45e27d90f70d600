"""PNG plots for the evaluation report. matplotlib is imported here only, with a file-only backend."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _pyplot():  # noqa: ANN202 (the pyplot module)
    import matplotlib

    matplotlib.use("Agg")  # no display on a training box
    import matplotlib.pyplot as plt

    return plt


def loss_curve(log_history: list[dict], path: Path) -> bool:
    """Training (and validation, if logged) loss against step; False when there is nothing to plot."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    valid = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not valid:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if valid:
        ax.plot(*zip(*valid), "o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def confusion_matrices(panels: dict[str, dict], path: Path) -> bool:
    """One heat map per panel ({title: classifier score}); rows intended genre, columns predicted."""
    panels = {title: score for title, score in panels.items() if score.get("confusion")}
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, score) in zip(axes[0], panels.items()):
        matrix, labels = score["confusion"], score["labels"]
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, str(value), ha="center", va="center")
        accuracy = score["accuracy"]
        ax.set_title(f"{title}\naccuracy {accuracy:.2f}" if accuracy is not None else title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("intended")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
