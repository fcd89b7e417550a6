"""The pictures a run leaves: learning curves, the test confusion matrix, and the
first layer's weights drawn as images.

Drawn with matplotlib's object API (a `Figure` saved by its Agg canvas: no pyplot, no
global state, no GUI backend), laid out by its constrained layout so that no text is cut
off or written over another. The runner imports matplotlib in the background while its
epochs run (experiment.import_in_background), so that it seldom waits for the import.
"""

import os
import textwrap
from typing import IO, TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from jax.typing import ArrayLike
import numpy as np

from mlp_jax.training.stack import Row

if TYPE_CHECKING:  # imported when drawing: the runner imports it in the background
  from matplotlib.figure import Figure

# Where a picture is saved: a path, or a binary file (workdir.atomic_file's).
Target = Union[str, "os.PathLike[str]", IO[bytes]]
SPLIT_COLOURS = {"train": "C0", "validation": "C1", "test": "C2"}
DPI = 100
TITLE_CHARACTERS = 105  # a title line of the curves' 10 inches, at 11 points


def _figure(width: float, height: float) -> "Figure":
  """A Figure of width × height inches, laid out when drawn (constrained layout)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(figure: "Figure", path: Target) -> None:
  """`figure` as a PNG at `path` (a path or a binary file)."""
  figure.savefig(path, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})


def wrapped(text: str, width: int = TITLE_CHARACTERS) -> list[str]:
  """`text`'s lines, each broken at spaces (a word too long for a line, between its
  letters) into lines of at most `width` characters."""
  return [line for paragraph in text.split("\n")
          for line in textwrap.wrap(paragraph, width) or [""]]


def curves_figure(history: Sequence[Row], label_smoothing: float = 0.0,
                  title: Optional[str] = None) -> "Figure":
  """Loss and accuracy per epoch (integer ticks), train vs test (and validation when
  present); rows with `_std` keys (several models) are drawn as the mean with a ± std
  band; a value that is not finite (a run that diverged) breaks its curve. `title`:
  what was trained (reports.run_title), above the plots.

  The train loss is the training objective: with label smoothing ε > 0 it is taken
  against smoothed targets and sits above the plain loss of the other splits, so its
  label says so. With DP-SGD (an `epsilon` in the rows) the title gives the last ε and
  says that the train curves are not private.
  """
  epochs = np.array([row["epoch"] for row in history], float)
  lines = [title] if title else []
  if history and "epsilon" in history[-1]:
    lines.append(f"DP-SGD: ε = {history[-1]['epsilon']:.2f} after epoch {int(epochs[-1])}; "
                 "the train curves are computed from the private batches without noise "
                 "and are not covered by ε")
  heading = wrapped("\n".join(lines)) if lines else []
  figure = _figure(10, 3.9 + 0.22 * len(heading))
  if heading:
    figure.suptitle("\n".join(heading), fontsize=11, parse_math=False)  # "$": as written
  for axes, metric in zip(figure.subplots(1, 2), ("loss", "accuracy")):
    for split, colour in SPLIT_COLOURS.items():
      key = f"{split}_{metric}"
      if not history or key not in history[0]:
        continue
      label = split
      if split == "train" and metric == "loss" and label_smoothing:
        label = f"train (label smoothing {label_smoothing:g})"
      _plot_metric(axes, history, key, colour, label)
    _label_epochs(axes, metric, epochs)
  return figure


def _plot_metric(axes: Any, history: Sequence[Row], key: str, colour: str, label: str
                 ) -> None:
  """history's `key` against its epochs on `axes`: the mean, and a ± std band where the
  rows have `key`_std (several models); a value that is not finite breaks the curve."""
  epochs = np.array([row["epoch"] for row in history], float)
  mean = np.array([row[key] for row in history], float)
  mean[~np.isfinite(mean)] = np.nan        # inf, too, breaks the curve
  axes.plot(epochs, mean, marker="o", markersize=4, color=colour, label=label)
  if f"{key}_std" in history[0]:
    std = np.array([row[f"{key}_std"] for row in history], float)
    axes.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)


def _label_epochs(axes: Any, metric: str, epochs: np.ndarray) -> None:
  """Integer epoch ticks, axis labels, a grid and the legend."""
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  axes.set(xlabel="epoch", ylabel=metric)
  axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  if len(epochs) and np.ptp(epochs) < 2:    # else the locator falls back to fractions
    axes.set_xlim(epochs.min() - 1, epochs.max() + 1)
  axes.grid(alpha=0.3)
  if axes.lines:
    axes.legend(loc="best")


def comparison_figure(runs: Mapping[str, Sequence[Row]], key: str = "test_accuracy",
                      title: Optional[str] = None) -> "Figure":
  """`key` (e.g. test_accuracy) per epoch of each named run's history on one axes, each
  the mean ± std of its models where it has several (mlp-jax compare)."""
  figure = _figure(8, 4.5)
  if title:
    figure.suptitle("\n".join(wrapped(title, 85)), fontsize=11, parse_math=False)
  axes = figure.subplots()
  for number, (name, history) in enumerate(runs.items()):
    _plot_metric(axes, history, key, f"C{number % 10}", name)
  epochs = np.array([row["epoch"] for history in runs.values() for row in history], float)
  _label_epochs(axes, key.replace("_", " "), epochs)
  return figure


def plot_curves(history: Sequence[Row], path: Target, label_smoothing: float = 0.0,
                title: Optional[str] = None) -> None:
  """curves_figure saved at `path`."""
  save(curves_figure(history, label_smoothing, title), path)


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int
                     ) -> np.ndarray:
  """counts[i, j] = number of examples of class i predicted as j, (K, K)."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def confusion_figure(counts: np.ndarray, class_names: Optional[Sequence[str]] = None,
                     model: Optional[str] = None) -> "Figure":
  """The confusion matrix as a heat map (Blues) with its counts written in, true classes
  down, predicted across, at least 4 inches wide so its title fits. Ticks carry the
  class names when given (Fashion-MNIST's T-shirt/top, ...), upright when they fit under
  their column; `model` names the model it shows (e.g. "model 3, seed 0")."""
  k = counts.shape[0]
  if k > SUMMARY_CLASSES:
    return _confusion_summary(counts, class_names, model)
  names = [str(c) for c in (class_names or range(k))]
  cell = max(0.3, min(0.6, 4.8 / k))                    # inches
  points = cell * 72
  count_size = min(10.0, points / (0.62 * len(str(counts.max())) + 0.5))
  longest = max(len(n) for n in names)
  upright = longest * 0.62 * 10 <= points - 4           # tick labels at 10 points
  names_inches = 0.09 * longest + 0.2                  # a column of names at 10 points
  figure = _figure(max(4.0, k * cell + names_inches + 0.6),     # + the axis label
                   k * cell + (0.3 if upright else names_inches) + 1.2)  # + it, the title
  axes = figure.subplots()
  axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
  for (i, j), count in np.ndenumerate(counts):
    axes.text(j, i, str(count), ha="center", va="center", fontsize=count_size,
              color="white" if count > counts.max() / 2 else "black",
              in_layout=False)  # inside its cell: the layout need not measure it
  axes.set_xticks(range(k), names, rotation=0 if upright else 90, fontsize=10,
                  parse_math=False)
  axes.set_yticks(range(k), names, fontsize=10, parse_math=False)
  axes.set(xlabel="predicted", ylabel="true")
  figure.suptitle(f"test confusion{', ' + model if model else ''}\n{counts.trace()} / "
                  f"{counts.sum()} right", fontsize=11, parse_math=False)
  return figure


# Past this many classes a cell per count cannot be read (and 1,000 classes took 900 s
# and 5 GB to draw so): the confusion is a summary (`_confusion_summary`).
SUMMARY_CLASSES = 40


def _confusion_summary(counts: np.ndarray, class_names: Optional[Sequence[str]],
                       model: Optional[str]) -> "Figure":
  """A confusion of many classes at a fixed size: the heat map of the fraction of each
  true class predicted as each class (rows sum to 1, so rare classes show), class
  numbers as ticks, and the five most frequent confusions named beneath."""
  k = counts.shape[0]
  names = [str(c) for c in (class_names or range(k))]
  rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  figure = _figure(7.0, 8.0)
  axes = figure.subplots()
  image = axes.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
  figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
  axes.set(xlabel="predicted (class number)", ylabel="true (class number)")
  off = counts.copy()
  np.fill_diagonal(off, 0)
  top = np.argsort(off, axis=None)[::-1][:5]
  pairs = [f"{names[i]} → {names[j]}: {off[i, j]}" for i, j in
           zip(*np.unravel_index(top, off.shape)) if off[i, j]]
  axes.set_title("\n".join(wrapped("most confused: " + ("; ".join(pairs) or "none"), 80)),
                 fontsize=8, parse_math=False, loc="left")
  figure.suptitle(f"test confusion{', ' + model if model else ''}, {k} classes\n"
                  f"{counts.trace()} / {counts.sum()} right", fontsize=11,
                  parse_math=False)
  return figure


def plot_confusion(counts: np.ndarray, path: Target,
                   class_names: Optional[Sequence[str]] = None, model: Optional[str] = None
                   ) -> None:
  """confusion_figure saved at `path`."""
  save(confusion_figure(counts, class_names, model), path)


def filters_mosaic(w1: ArrayLike, input_shape: Sequence[int], max_units: int = 64
                   ) -> np.ndarray:
  """The first `max_units` rows of W1 (H, D) as images of `input_shape` (h, w), each
  divided by its largest |weight|, tiled in rows of ⌈√units⌉ with one-pixel gaps (NaN)."""
  h, w = input_shape
  weights = np.asarray(w1, np.float64)
  units = min(weights.shape[0], max_units)
  cols = int(np.ceil(np.sqrt(units)))
  rows = int(np.ceil(units / cols))
  tiles = weights[:units].reshape(units, h, w)
  with np.errstate(invalid="ignore"):  # a unit of a diverged run: NaN, drawn white
    tiles = tiles / np.maximum(np.abs(tiles).max(axis=(1, 2), keepdims=True), 1e-12)
  mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, cols)
    mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tile
  return mosaic


def filters_figure(w1: ArrayLike, input_shape: Sequence[int], max_units: int = 64
                   ) -> "Figure":
  """filters_mosaic drawn: what each hidden unit responds to. Red is positive, blue
  negative (RdBu_r), each unit scaled to its own largest |weight|, NaN white, with the
  colour scale."""
  mosaic = filters_mosaic(w1, input_shape, max_units)
  figure = _figure(6.4, 5.4)
  axes = figure.subplots()
  image = axes.imshow(mosaic, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
  axes.set_axis_off()
  figure.suptitle(f"W1: the first {min(np.shape(w1)[0], max_units)} of "
                  f"{np.shape(w1)[0]} hidden units", fontsize=11)
  figure.colorbar(image, ax=axes, label="weight / the unit's largest |weight|")
  return figure


def is_image(input_shape: Sequence[int], in_dim: int) -> bool:
  """True when the inputs are images: input_shape (h, w) with h·w = D."""
  return len(input_shape) == 2 and input_shape[0] * input_shape[1] == in_dim


def plot_filters(w1: ArrayLike, input_shape: Sequence[int], path: Target) -> bool:
  """filters_figure saved at `path` (a path or a binary file); returns False (and writes
  nothing) unless the input is an image (is_image)."""
  if not is_image(input_shape, np.shape(w1)[1]):
    return False
  save(filters_figure(w1, input_shape), path)
  return True
