"""The pictures a training run leaves in MLflow: curves, confusion matrix, reliability, mistakes,
and the map of what the model sees in the validation images.

Each function writes one PNG and returns its path. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import math
from pathlib import Path

# The object-oriented API without pyplot: no GUI backend to pick, and half a second less to import.
from matplotlib.figure import Figure

DPI = 110


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def _subplots(*grid: int, figsize: tuple[float, float], **options):
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **options)


def training_curves(history: list[dict], path: Path) -> Path:
    epochs = [record["epoch"] for record in history]
    figure, (loss_axes, accuracy_axes, lr_axes) = _subplots(1, 3, figsize=(13, 3.8))
    loss_axes.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_axes.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    loss_axes.set(title="loss", xlabel="epoch")
    accuracy_axes.plot(epochs, [r["train_accuracy"] for r in history], marker="o", label="train top-1")
    accuracy_axes.plot(epochs, [r["val_top1"] for r in history], marker="o", label="validation top-1")
    accuracy_axes.plot(epochs, [r["val_top5"] for r in history], marker=".", linestyle="--", label="validation top-5")
    accuracy_axes.set(title="accuracy", xlabel="epoch", ylim=(0, 1))
    lr_axes.plot(epochs, [r["lr"] for r in history], marker="o")
    lr_axes.set(title="learning rate (end of epoch)", xlabel="epoch")
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    return _save(figure, path)


def confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    """Rows are true classes, columns predicted; cells are shaded by the share of their row."""
    count = len(classes)
    side = min(4 + 0.45 * count, 30)
    figure, axes = _subplots(figsize=(side, side * 0.85))
    totals = [max(1, sum(row)) for row in matrix]
    shares = [[cell / total for cell in row] for row, total in zip(matrix, totals)]
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(count), classes, rotation=60 if count > 6 else 0, ha="right" if count > 6 else "center")
    axes.set_yticks(range(count), classes)
    axes.set(xlabel="predicted", ylabel="true", title="confusion matrix (share of each true class)")
    if count <= 30:  # numbers stay legible up to about this many classes
        for row in range(count):
            for column in range(count):
                axes.text(column, row, str(matrix[row][column]), ha="center", va="center", fontsize=8,
                          color="white" if shares[row][column] > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046)
    return _save(figure, path)


def reliability_diagram(bins: list[dict], ece: float, path: Path) -> Path:
    figure, axes = _subplots(figsize=(5, 5))
    filled = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    axes.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
             edgecolor="black", alpha=0.8, label="accuracy")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
             title=f"reliability (ECE {ece:.3f})")
    axes.legend(loc="upper left")
    return _save(figure, path)


def mistakes_grid(mistakes: list[dict], classes: list[str], path: Path) -> Path:
    """The most confident wrong predictions, each titled `true → predicted (confidence)`."""
    columns = 5
    rows = max(1, math.ceil(len(mistakes) / columns))
    figure, grid = _subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for axes, mistake in zip(grid.flat, mistakes):
        axes.imshow(mistake["image"].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes.set_title(f"{classes[mistake['target']]} → {classes[mistake['predicted']]}\n"
                       f"({100 * mistake['confidence']:.0f}%)", fontsize=8)
    if not mistakes:
        grid[0][0].text(0, 0.5, "no mistakes", fontsize=12)
    figure.suptitle("most confident mistakes: true → predicted")
    return _save(figure, path)


def embedding_map(points: dict, classes: list[str], path: Path) -> Path:
    """Validation images on the first two principal components of the train split's embeddings,
    coloured by true class; the misclassified ones ringed in black."""
    from matplotlib import colormaps

    figure, axes = _subplots(1, 1, figsize=(7.5, 6))
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"]
    for index, name in enumerate(classes):
        members = [i for i, target in enumerate(points["target"]) if target == index]
        axes.scatter([points["x"][i] for i in members], [points["y"][i] for i in members], s=10, alpha=0.8,
                     color=palette(index if len(classes) <= 20 else index / max(1, len(classes) - 1)),
                     label=name if len(classes) <= 20 else None)
    wrong = [i for i, (target, guess) in enumerate(zip(points["target"], points["predicted"])) if target != guess]
    axes.scatter([points["x"][i] for i in wrong], [points["y"][i] for i in wrong], s=28, facecolors="none",
                 edgecolors="black", linewidths=0.8, label=f"misclassified ({len(wrong)} of {len(points['x'])})")
    axes.legend(fontsize=7, loc="best")
    axes.set(title="validation images: what the model sees (PCA of its embeddings)", xlabel="component 1",
             ylabel="component 2")
    return _save(figure, path)
