"""The pictures a run leaves: learning curves, the test confusion matrix, and the
first layer's weights drawn as images."""

from typing import IO, Optional, Sequence, Union

from jax.typing import ArrayLike
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from mlp_jax.training.stack import Row

# Where a picture is saved: a path, or a binary file (workdir.atomic_file's).
Target = Union[str, IO[bytes]]


def plot_curves(history: Sequence[Row], path: Target, label_smoothing: float = 0.0,
                title: Optional[str] = None) -> None:
  """curves_figure saved at `path`."""
  curves_figure(history, label_smoothing, title).savefig(path, dpi=100)


def curves_figure(history: Sequence[Row], label_smoothing: float = 0.0,
                  title: Optional[str] = None) -> Figure:
  """Loss and accuracy per epoch (integer ticks), train vs test (and validation when
  present); rows with `_std` keys (several models) are drawn as the mean with a ± std
  band. `title`: what was trained (reports.run_title), above the plots.

  The train loss is the training objective: with label smoothing ε > 0 it is taken
  against smoothed targets and sits above the plain loss of the other splits, so its
  label says so. With DP-SGD (an `epsilon` in the rows) the title gives the last ε and
  says that the train curves are not private.
  """
  epochs = [row["epoch"] for row in history]
  fig = Figure(figsize=(10, 4.6))  # no pyplot: no global state, no GUI backend
  lines = [title] if title else []
  if history and "epsilon" in history[-1]:
    lines.append(f"DP-SGD: ε = {history[-1]['epsilon']:.2f} after epoch {epochs[-1]}; the "
                 "train curves are computed from the private batches without noise and "
                 "are not covered by ε")
  if lines:
    fig.suptitle("\n".join(lines), fontsize=9)
  axes = fig.subplots(1, 2)
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split in ("train", "validation", "test"):
      key = f"{split}_{metric}"
      if history and key in history[0]:
        label = split
        if split == "train" and metric == "loss" and label_smoothing:
          label = f"train (label smoothing {label_smoothing:g})"
        mean = np.array([row[key] for row in history])
        line, = ax.plot(epochs, mean, marker=".", label=label)
        if f"{key}_std" in history[0]:  # several seeds: the mean with a ± std band
          std = np.array([row[f"{key}_std"] for row in history])
          ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  return fig


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int
                     ) -> np.ndarray:
  """counts[i, j] = number of examples of class i predicted as j, (K, K)."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def plot_confusion(counts: np.ndarray, path: Target,
                   class_names: Optional[Sequence[str]] = None, model: Optional[str] = None
                   ) -> None:
  """The confusion matrix as a heat map with its counts written in, saved at `path`."""
  confusion_figure(counts, class_names, model).savefig(path, dpi=100)


def confusion_figure(counts: np.ndarray, class_names: Optional[Sequence[str]] = None,
                     model: Optional[str] = None) -> Figure:
  """The Figure of plot_confusion; at least 4 inches wide, so its title always fits.
  Ticks carry the class names when given (Fashion-MNIST's T-shirt/top, ...); `model`
  names the model it shows (e.g. "model 3, seed 0")."""
  k = counts.shape[0]
  names = [str(c) for c in (class_names or range(k))]
  longest = max(len(n) for n in names)
  size = max(4.0, 1 + 0.6 * k + 0.07 * longest)  # room for the title and the names
  fig = Figure(figsize=(size, size))
  ax = fig.subplots()
  ax.imshow(counts, cmap="Blues")
  for i in range(k):
    for j in range(k):
      ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
              color="white" if counts[i, j] > counts.max() / 2 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_xticks(range(k), names, rotation=90 if longest > 2 else 0)
  ax.set_yticks(range(k), names)
  ax.set_title(f"test confusion{', ' + model if model else ''}\n{counts.trace()} / "
               f"{counts.sum()} right", fontsize=9)
  fig.tight_layout()
  return fig


def filters_figure(w1: ArrayLike, input_shape: Sequence[int], max_units: int = 64) -> Figure:
  """The first `max_units` rows of W1 (H, D) drawn as images of `input_shape` (h, w),
  tiled in one picture: what each hidden unit responds to. Red is positive, blue
  negative, each unit scaled to its own largest |weight|."""
  h, w = input_shape
  weights = np.asarray(w1, np.float64)
  units = min(weights.shape[0], max_units)
  cols = int(np.ceil(np.sqrt(units)))
  rows = int(np.ceil(units / cols))
  tiles = weights[:units].reshape(units, h, w)
  tiles = tiles / np.maximum(np.abs(tiles).max(axis=(1, 2), keepdims=True), 1e-12)
  mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)  # NaN: the gaps
  for i, tile in enumerate(tiles):
    r, c = divmod(i, cols)
    mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tile
  fig = Figure(figsize=(max(4.0, cols * 0.9), max(4.0, rows * 0.9) + 0.4))
  ax = fig.subplots()
  image = ax.imshow(mosaic, cmap="RdBu_r", vmin=-1, vmax=1)
  ax.axis("off")
  ax.set_title(f"W1: the first {units} of {weights.shape[0]} hidden units")
  fig.colorbar(image, ax=ax, shrink=0.8, label="weight / the unit's largest |weight|")
  fig.tight_layout()
  return fig


def is_image(input_shape: Sequence[int], in_dim: int) -> bool:
  """True when the inputs are images: input_shape (h, w) with h·w = D."""
  return len(input_shape) == 2 and input_shape[0] * input_shape[1] == in_dim


def plot_filters(w1: ArrayLike, input_shape: Sequence[int], path: Target) -> bool:
  """filters_figure saved at `path` (a path or a binary file); returns False (and writes
  nothing) unless the input is an image (is_image)."""
  if not is_image(input_shape, np.shape(w1)[1]):

    return False
  filters_figure(w1, input_shape).savefig(path, dpi=100)
  return True
