"""The figures a person reads a training run by, rendered to PNG bytes for MLflow."""

from __future__ import annotations

import io

import torch

CURVE_SIZE_IN = (10, 4)
MAX_LABELLED_CLASSES = 20  # beyond this a confusion matrix is read as a picture, not cell by cell


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def training_curves(history: list[dict], *, title: str) -> bytes:
    """Loss (train, validation) and validation accuracy per epoch, EMA too where the run has one."""
    figure = _figure(CURVE_SIZE_IN)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [record["epoch"] + 1 for record in history]
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("ema_val_loss", "validation, EMA")):
        if all(key in record for record in history):
            loss_axes.plot(epochs, [record[key] for record in history], marker="o", label=label)
    loss_axes.set(title="loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    for key, label in (("val_top1", "top-1"), ("val_top5", "top-5"), ("ema_val_top1", "top-1, EMA")):
        if all(key in record for record in history):
            accuracy_axes.plot(epochs, [100 * record[key] for record in history], marker="o", label=label)
    accuracy_axes.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(title)
    return _png(figure)


def confusion_matrix(counts: torch.Tensor, classes: list[str], *, title: str) -> bytes:
    """Rows: true class; columns: predicted; each row as a share of that class's samples."""
    counts = counts.double()
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    side = min(12.0, 3.0 + 0.45 * n)
    figure = _figure((side + 1.5, side))
    axes = figure.subplots()
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    axes.set(title=title, xlabel="predicted class", ylabel="true class")
    if n <= MAX_LABELLED_CLASSES:
        axes.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 3 else 0)
        axes.set_yticks(range(n), classes)
        for true in range(n):
            for predicted in range(n):
                if counts[true, predicted] > 0:
                    axes.text(predicted, true, f"{int(counts[true, predicted])}", ha="center", va="center",
                              fontsize=8, color="white" if shares[true, predicted] > 0.5 else "black")
    return _png(figure)


def parallel_coordinates(trials: list[dict], dimensions: list[str], metric: str, *, title: str) -> bytes:
    """One line per trial across the swept values and the metric, each axis scaled to its own range
    (choices as categories), coloured by the metric: which regions of the space did well."""
    from matplotlib import colormaps

    axes_names = [*dimensions, metric]
    figure = _figure((max(6.0, 1.8 * len(axes_names)), 4.5))
    axes = figure.subplots()
    scaled, labels = [], []
    for name in axes_names:
        values = [trial.get(name) for trial in trials]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            low, high = min(values), max(values)
            scaled.append([(v - low) / (high - low) if high > low else 0.5 for v in values])
            labels.append((f"{high:.3g}", f"{low:.3g}"))
        else:
            categories = sorted({repr(v) for v in values})
            step = 1 / max(len(categories) - 1, 1)
            scaled.append([categories.index(repr(v)) * step if len(categories) > 1 else 0.5 for v in values])
            labels.append((categories[-1], categories[0]))
    scores = scaled[-1]
    colours = colormaps["viridis"]
    for index in range(len(trials)):
        axes.plot(range(len(axes_names)), [column[index] for column in scaled], color=colours(scores[index]),
                  marker="o", alpha=0.85)
    for position, (high, low) in enumerate(labels):
        axes.axvline(position, color="grey", linewidth=0.8)
        axes.annotate(high, (position, 1.0), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
        axes.annotate(low, (position, 0.0), xytext=(0, -12), textcoords="offset points", ha="center", fontsize=8)
    axes.set_xticks(range(len(axes_names)), axes_names, rotation=15)
    axes.set_yticks([])
    axes.set_ylim(-0.1, 1.1)
    axes.set_title(f"{title}: {len(trials)} trials, coloured by {metric}")
    return _png(figure)
