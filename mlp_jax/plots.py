"""The pictures a run leaves: learning curves and the test confusion matrix."""

from matplotlib.figure import Figure
import numpy as np


def plot_curves(history, path):
  """Loss and accuracy per epoch, train vs test (and validation when present)."""
  epochs = [row["epoch"] for row in history]
  fig = Figure(figsize=(10, 4))  # no pyplot: no global state, no GUI backend
  axes = fig.subplots(1, 2)
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split in ("train", "validation", "test"):
      key = f"{split}_{metric}"
      if history and key in history[0]:
        ax.plot(epochs, [row[key] for row in history], marker=".", label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def confusion_matrix(labels, predictions, num_classes):
  """counts[i, j] = number of examples of class i predicted as j, (K, K)."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def plot_confusion(counts, path):
  """The confusion matrix as a heat map with its counts written in, saved at `path`."""
  confusion_figure(counts).savefig(path, dpi=100)


def confusion_figure(counts):
  """The Figure of plot_confusion; at least 4 inches wide, so its title always fits."""
  k = counts.shape[0]
  size = max(4.0, 1 + 0.6 * k)  # wide enough for the title at any K
  fig = Figure(figsize=(size, size))
  ax = fig.subplots()
  ax.imshow(counts, cmap="Blues")
  for i in range(k):
    for j in range(k):
      ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
              color="white" if counts[i, j] > counts.max() / 2 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_xticks(range(k))
  ax.set_yticks(range(k))
  ax.set_title(f"test confusion\n{counts.trace()} / {counts.sum()} right")
  fig.tight_layout()
  return fig
