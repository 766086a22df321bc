"""Pictures a stage logs to its MLflow run under `plots/`: training curves from the run's own
metric history, the confusion matrix of the test split, and attention maps. Rendered with
matplotlib's Agg backend (no display); each function writes one PNG and returns its path."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from components.tracking import Tracker

PLOTS = "plots"  # the artifact folder of every picture


def log(tracker: Tracker, pictures: list[Path]) -> None:
    tracker.log_artifacts(pictures, PLOTS)


# pyplot's figure registry and matplotlib's font-pattern parser are not thread-safe, and task
# branches side by side draw at the same time (two sweeps ending together broke both): one at a time.
_DRAWING = threading.RLock()


@contextlib.contextmanager
def pyplot() -> Iterator:
    """matplotlib.pyplot on the Agg backend, held by this thread until the block ends."""
    with _DRAWING:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        yield plt


def _history(tracker: Tracker, key: str) -> tuple[list[int], list[float]]:
    points = tracker.metric_history(key)
    return [step for step, _ in points], [value for _, value in points]


def training_curves(tracker: Tracker, folder: Path, *, eval_key: str | None = None) -> list[Path]:
    """loss.png (training loss by optimizer step; `eval_key` by epoch beside it when logged per
    epoch) and learning_rate.png, from what the training loop logged to the tracker's run."""
    with pyplot() as plt:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        steps, losses = _history(tracker, "train/loss")
        epochs, evals = _history(tracker, eval_key) if eval_key else ([], [])
        if steps:
            panels = 2 if len(epochs) > 1 else 1
            figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.4), squeeze=False)
            axes[0][0].plot(steps, losses, color="tab:blue", linewidth=1)
            axes[0][0].set(xlabel="optimizer step", ylabel="train/loss", title="training loss")
            if panels == 2:
                axes[0][1].plot(epochs, evals, marker="o", color="tab:orange")
                axes[0][1].set(xlabel="epoch", ylabel=eval_key, title="validation")
            for axis in axes[0]:
                axis.grid(alpha=0.3)
            written.append(_save(plt, figure, folder / "loss.png"))
        steps, rates = _history(tracker, "train/learning_rate")
        if steps:
            figure, axis = plt.subplots(figsize=(5, 3.4))
            axis.plot(steps, rates, color="tab:green")
            axis.set(xlabel="optimizer step", ylabel="learning rate", title="learning-rate schedule")
            axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            axis.grid(alpha=0.3)
            written.append(_save(plt, figure, folder / "learning_rate.png"))
        return written


def by_epoch(tracker: Tracker, key: str, path: Path) -> list[Path]:
    """`key` (a validation score such as eval/bleu) by epoch, as the loop logged it; none when not logged."""
    epochs, values = _history(tracker, key)
    if not epochs:
        return []
    with pyplot() as plt:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure, axis = plt.subplots(figsize=(5, 3.4))
        axis.plot(epochs, values, marker="o", color="tab:purple")
        axis.set(xlabel="epoch", ylabel=key, title=f"validation {key.removeprefix('eval/')}")
        axis.grid(alpha=0.3)
        return [_save(plt, figure, path)]


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, *, title: str) -> Path:
    """Counts with true labels as rows and predictions as columns, each cell annotated."""
    with pyplot() as plt:
        size = max(3.6, 0.6 * len(labels) + 2)
        figure, axis = plt.subplots(figsize=(size, size * 0.85))
        image = axis.imshow(matrix, cmap="Blues")
        figure.colorbar(image, ax=axis, fraction=0.046)
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axis.set_yticks(range(len(labels)), labels)
        axis.set(xlabel="predicted", ylabel="true", title=title)
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
        return _save(plt, figure, path)


def attention(maps: list[dict], path: Path) -> Path:
    """One heatmap per text: heads (rows) x tokens (columns), the summary token's attention; for a
    translation, target tokens (rows) x source tokens (columns), the decoder's cross-attention."""
    with pyplot() as plt:
        widest = max(len(item["tokens"]) for item in maps)
        tallest = max(len(item.get("target_tokens", [])) for item in maps)
        figure, axes = plt.subplots(
            len(maps),
            1,
            figsize=(max(6, 0.42 * widest + 2), 1.2 + max(1.6, 0.3 * tallest) * len(maps)),
            squeeze=False,
        )
        for axis, item in zip(axes[:, 0], maps, strict=True):
            if "target_tokens" in item:
                _cross_attention(figure, axis, item)
                continue
            heads = len(item["attention"])
            image = axis.imshow(item["attention"], cmap="viridis", aspect="auto", vmin=0)
            axis.set_xticks(range(len(item["tokens"])), item["tokens"], rotation=60, ha="right", fontsize=8)
            axis.set_yticks(range(heads), [f"head {h}" for h in range(heads)], fontsize=8)
            axis.set_title(
                f"{item['label']} ({item['score']:.2f}), layer {item['layer']}, from {item['query_token']}: "
                f"{_short(item['text'])}",
                fontsize=9,
            )
            figure.colorbar(image, ax=axis, fraction=0.02)
        return _save(plt, figure, path)


def _cross_attention(figure, axis, item: dict) -> None:
    image = axis.imshow(item["attention"], cmap="viridis", aspect="auto", vmin=0)
    axis.set_xticks(range(len(item["tokens"])), item["tokens"], rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(item["target_tokens"])), item["target_tokens"], fontsize=8)
    axis.set_title(f"{_short(item['text'])} -> {_short(item['translation'])}, layer {item['layer']}", fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.02)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
