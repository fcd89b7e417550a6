"""The pictures a run leaves: nothing cut off or written over, each labelled so it
reads right, the data where the axes say it is. Each picture is drawn by matplotlib's
Agg canvas and read back: its texts' boxes on the canvas and its pixels. (A glyph
missing from the font is a warning, and warnings are errors in the suite: the titles
drawn here carry ε, ± and ×.)"""

import itertools

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
import numpy as np
from PIL import Image
import pytest

from mlp_jax.run import plots

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")


def history(epochs, keys=("train", "test"), std=False, **extra):
  return [{"epoch": e, **{f"{s}_{m}": (1.0 / e if m == "loss" else 1 - 0.5 / e)
                          for s in keys for m in ("loss", "accuracy")},
           **({f"{s}_{m}_std": 0.02 for s in keys for m in ("loss", "accuracy")} if std
              else {}), **{k: v * e for k, v in extra.items()}}
          for e in range(1, epochs + 1)]


# A run that diverged: the loss NaN from epoch 3, the test loss inf at epoch 3, bands.
DIVERGED = [{"epoch": e, "train_loss": np.nan if e > 2 else 1.0,
             "test_loss": np.inf if e == 3 else 0.5 / e, "test_loss_std": 0.1,
             "train_accuracy": 0.5, "test_accuracy": 0.4, "test_accuracy_std": 0.01}
            for e in range(1, 8)]
LONG_TITLE = ("npz:a_table_with_a_long_name.npz: a 784-1024-10 MLP, optimizer=adamw, "
              "learning_rate=0.001, weight_decay=0.0001, batch_size=128, "
              "label_smoothing=0.1, input_scaling=per_feature, warmup_epochs=5\n"
              "the band: mean ± std over 5 folds × 3 seeds")
PICTURES = {
    "curves, one epoch": lambda: plots.curves_figure(history(1)),
    "curves, 30 epochs, three splits, bands": lambda: plots.curves_figure(
        history(30, ("train", "validation", "test"), std=True), 0.1, LONG_TITLE),
    "curves, DP-SGD": lambda: plots.curves_figure(history(7, epsilon=0.5), 0, LONG_TITLE),
    "curves, a title of one long word": lambda: plots.curves_figure(
        history(3), title="npz:" + "a_table_with_a_very_long_name" * 8 + ".npz: a 6-16-3 MLP"),
    "curves, diverged": lambda: plots.curves_figure(DIVERGED),
    "curves, nothing finite": lambda: plots.curves_figure(
        [{"epoch": e, "test_loss": np.nan, "test_accuracy": np.nan} for e in (1, 2)]),
    "curves, constant": lambda: plots.curves_figure(
        [{"epoch": e, "test_loss": 0.5, "test_accuracy": 1.0} for e in range(1, 4)]),
    **{f"confusion, K={k}{', named' if named else ''}": (
        lambda k=k, named=named: plots.confusion_figure(
            np.arange(k * k).reshape(k, k) * 99_999 // (k * k),
            (FASHION * 100)[:k] if named else None, "model 12, seed 3, fold 4"))
       for k, named in itertools.product((2, 3, 10, 26, 41, 1000), (False, True))},
    **{f"filters, {units} units of {h}×{w}": (
        lambda units=units, h=h, w=w: plots.filters_figure(
            np.random.default_rng(0).normal(size=(units, h * w)), (h, w)))
       for units, (h, w) in itertools.product((1, 5, 64, 256), ((8, 8), (28, 28)))},
}


class Drawn:
  """A figure drawn on an Agg canvas: its pixels (rows from the top) and the boxes of
  the texts it drew, (left, top, right, bottom) in pixels from the top left."""

  def __init__(self, figure):
    FigureCanvasAgg(figure).draw()
    self.figure = figure
    self.pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    self.height, self.width = self.pixels.shape[:2]

  def box(self, artist):
    extent = artist.get_window_extent()
    return (extent.x0, self.height - extent.y1, extent.x1, self.height - extent.y0)

  def texts(self):
    """(text, box) of every text drawn: visible, not empty, a tick's label only where its
    tick is within the axis' view."""
    hidden = set()
    for axes in self.figure.axes:
      for axis in (axes.xaxis, axes.yaxis):
        low, high = sorted(axis.get_view_interval())
        hidden |= {id(tick.label1) for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                   if tick.get_loc() is None
                   or not low - 1e-9 * abs(high - low) <= tick.get_loc() <= high + 1e-9 * abs(high - low)}
    return [(t, self.box(t)) for t in self.figure.findobj(Text)
            if t.get_visible() and t.get_text() and id(t) not in hidden]

  def pixel(self, axes, x, y):
    """The (column, row) where the data point (x, y) of `axes` is drawn."""
    px, py = axes.transData.transform((x, y))
    return round(px), round(self.height - py)

  def colour(self, axes, x, y):
    column, row = self.pixel(axes, x, y)
    return tuple(int(v) for v in self.pixels[row, column])


@pytest.mark.parametrize("name", PICTURES)
def test_every_text_is_inside_the_picture_and_none_overlaps_another(name):
  drawn = Drawn(PICTURES[name]())
  assert 300 <= drawn.width <= 1200 and 200 <= drawn.height <= 1200
  texts = drawn.texts()
  boxes = np.array([box for _, box in texts])
  assert ((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= drawn.width)
          & (boxes[:, 3] <= drawn.height)).all(), [t for t, b in texts]
  left, top, right, bottom = (boxes[:, None, i] for i in range(4))
  overlap = ((np.minimum(right, right.T) > np.maximum(left, left.T) + 0.5)
             & (np.minimum(bottom, bottom.T) > np.maximum(top, top.T) + 0.5))
  np.fill_diagonal(overlap, False)
  pairs = [(texts[i][0].get_text(), texts[j][0].get_text()) for i, j in np.argwhere(overlap)]
  assert not pairs, pairs[:4]
  title = drawn.figure.get_suptitle()
  if title:
    title_bottom = drawn.box(drawn.figure._suptitle)[3]  # pylint: disable=protected-access
    assert all(title_bottom < drawn.box(axes)[1] for axes in drawn.figure.axes)


def test_a_picture_is_saved_as_a_png_of_its_size(tmp_path):
  figure = plots.curves_figure(history(3))
  plots.plot_curves(history(3), tmp_path / "c.png")
  with Image.open(tmp_path / "c.png") as saved:
    assert saved.format == "PNG" and saved.size == tuple(
        round(v) for v in figure.get_size_inches() * plots.DPI)


def test_confusion_names_the_classes_counts_and_model():
  counts = np.array([[5, 1, 0], [0, 9, 2], [1, 0, 7]])
  axes = plots.confusion_figure(counts, FASHION[:3], model="model 4, seed 1").axes[0]
  assert ([t.get_text() for t in axes.get_xticklabels()]
          == [t.get_text() for t in axes.get_yticklabels()] == list(FASHION[:3]))
  assert [t.get_text() for t in axes.texts] == [str(c) for c in counts.ravel()]
  assert axes.figure.get_suptitle() == "test confusion, model 4, seed 1\n21 / 25 right"
  plain = plots.confusion_figure(counts).axes[0]
  assert [t.get_text() for t in plain.get_xticklabels()] == ["0", "1", "2"]


def test_a_confusion_of_many_classes_is_a_summary_drawn_in_bounded_memory():
  """1,000 classes (900 s and 5 GB cell by cell): a fixed-size heat map of each true
  class's fractions, the most frequent confusions named; tracemalloc's peak < 500 MB."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  k = 1000
  counts = np.eye(k, dtype=np.int64) * 7
  counts[5, 9], counts[700, 3] = 6, 2
  tracemalloc.start()
  try:
    drawn = Drawn(plots.confusion_figure(counts, [f"class {i}" for i in range(k)]))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 500 << 20, f"{peak / 2**20:.0f} MiB"
  axes = drawn.figure.axes[0]
  assert "1000 classes" in drawn.figure.get_suptitle()
  assert axes.get_title(loc="left") == ("most confused: class 5 → class 9: 6; class 700 → "
                                        "class 3: 2")
  assert len(drawn.texts()) < 40   # no text per cell


def test_confusion_shades_each_cell_by_its_count():
  counts = np.array([[40, 3, 0], [1, 25, 9], [17, 5, 30]])
  drawn = Drawn(plots.confusion_figure(counts))
  axes = drawn.figure.axes[0]
  shade = {int(counts[i, j]): sum(drawn.colour(axes, j - 0.4, i - 0.4))
           for i, j in np.ndindex(*counts.shape)}
  darkness = [shade[c] for c in sorted(shade)]
  assert darkness == sorted(darkness, reverse=True) and len(set(darkness)) == counts.size
  assert shade[0] > 750 and shade[40] < 200            # none white, most dark blue


def test_the_legend_names_the_splits_and_the_smoothed_train_loss():
  figure = plots.curves_figure(history(2), label_smoothing=0.2)
  legends = [[t.get_text() for t in axes.get_legend().get_texts()] for axes in figure.axes]
  assert legends == [["train (label smoothing 0.2)", "test"], ["train", "test"]]
  assert [[t.get_text() for t in axes.get_legend().get_texts()]
          for axes in plots.curves_figure(history(2)).axes] == [["train", "test"]] * 2
  assert [axes.get_ylabel() for axes in figure.axes] == ["loss", "accuracy"]


def test_several_seeds_are_drawn_as_a_mean_with_a_band():
  rows = [{"epoch": e, "test_accuracy": 0.9, "test_accuracy_std": 0.05, "test_loss": 0.3,
           "test_loss_std": 0.01} for e in (1, 2, 3)]
  drawn = Drawn(plots.curves_figure(rows))
  accuracy = drawn.figure.axes[1]
  low, high = accuracy.get_ylim()
  assert low < 0.85 and 0.95 < high
  inside, outside = drawn.colour(accuracy, 2.5, 0.925), drawn.colour(accuracy, 2.5, 0.953)
  assert outside == (255, 255, 255) and inside != outside
  assert inside[1] > inside[0] and inside[1] > inside[2]  # the test split's green, faint
  assert drawn.colour(accuracy, 2.5, 0.875) == inside


def test_each_curve_passes_through_its_values():
  rows = history(5)
  drawn = Drawn(plots.curves_figure(rows))
  for row in rows:
    assert drawn.colour(drawn.figure.axes[0], row["epoch"], row["test_loss"]) == (
        0x2c, 0xa0, 0x2c)  # the test split's marker


def test_the_legend_sits_where_it_covers_no_point_of_the_curves():
  rows = history(10)
  drawn = Drawn(plots.curves_figure(rows))
  for axes, metric in zip(drawn.figure.axes, ("loss", "accuracy")):
    left, top, right, bottom = drawn.box(axes.get_legend())
    for row, split in itertools.product(rows, ("train", "test")):
      x, y = drawn.pixel(axes, row["epoch"], row[f"{split}_{metric}"])
      assert not (left <= x <= right and top <= y <= bottom), (metric, row["epoch"])


def test_a_diverged_run_is_drawn_where_its_values_are_finite():
  drawn = Drawn(plots.curves_figure(DIVERGED))
  loss = drawn.figure.axes[0]
  low, high = loss.get_ylim()
  assert low < 0.5 / 7 - 0.1 and 1.0 < high < 1.2
  for row in DIVERGED:
    for split, colour in (("train", (0x1f, 0x77, 0xb4)), ("test", (0x2c, 0xa0, 0x2c))):
      if np.isfinite(row[f"{split}_loss"]):
        assert drawn.colour(loss, row["epoch"], row[f"{split}_loss"]) == colour, (
            split, row["epoch"])


@pytest.mark.parametrize("epochs", [1, 7, 200])
def test_the_epochs_are_whole_numbers_within_the_run(epochs):
  drawn = Drawn(plots.curves_figure(history(epochs)))
  for axes in drawn.figure.axes:
    ticks = [float(t.get_text().replace("−", "-")) for t, _ in drawn.texts()
             if t in axes.get_xticklabels()]
    assert ticks and all(v.is_integer() and 0 <= v <= epochs + 1 for v in ticks)


def test_curves_say_what_was_trained_and_the_dp_caveat():
  rows = history(7, epsilon=0.5)
  figure = plots.curves_figure(rows, title="digits: a 64-256-10 MLP, lr=0.001")
  title = " ".join(figure.get_suptitle().split("\n"))
  assert title.startswith("digits: a 64-256-10 MLP, lr=0.001 DP-SGD: ε = 3.50 after epoch 7")
  assert title.endswith("not covered by ε")
  plain = [{k: v for k, v in row.items() if k != "epsilon"} for row in rows]
  assert plots.curves_figure(plain).get_suptitle() == ""


def test_dollar_signs_in_a_title_or_a_class_name_are_text_not_mathtext():
  title = "npz:/tmp/a$b_{$.npz: a 4-16-2 MLP"        # mathtext would refuse it
  drawn = Drawn(plots.curves_figure(history(3), title=title))
  assert drawn.figure.get_suptitle() == title
  names = ["$5$", "x_{$"]
  drawn = Drawn(plots.confusion_figure(np.eye(2, dtype=int), names, "model $1$"))
  axes = drawn.figure.axes[0]
  assert [t.get_text() for t in axes.get_xticklabels()] == names
  assert not [t for t, _ in drawn.texts() if t.get_text() in names and t.get_parse_math()]


def test_a_long_title_is_broken_into_lines_that_fit():
  lines = plots.curves_figure(history(3), title=LONG_TITLE).get_suptitle().split("\n")
  assert len(lines) >= 3 and " ".join(lines) == LONG_TITLE.replace("\n", " ")


def test_filters_are_drawn_for_square_images_only(tmp_path):
  w1 = np.arange(5 * 64, dtype=float).reshape(5, 64)
  assert plots.plot_filters(w1, (8, 8), tmp_path / "f.png")
  assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
  mosaic = plots.filters_mosaic(w1, (8, 8))
  assert mosaic.shape == (2 * 9 - 1, 3 * 9 - 1)          # 5 units: 2 rows of 3, 1-pixel gaps
  np.testing.assert_allclose(mosaic[:8, :8], w1[0].reshape(8, 8) / w1[0].max())
  assert np.isnan(mosaic[8]).all() and np.isnan(mosaic[9:, 18:]).all()
  assert not plots.plot_filters(w1[:, :6], (6,), tmp_path / "g.png")
  assert not (tmp_path / "g.png").exists()


def test_filters_of_a_diverged_run_are_drawn_without_a_warning():
  w1 = np.random.default_rng(0).normal(size=(4, 64))
  w1[0, 3], w1[1] = np.inf, np.nan      # warnings are errors in the suite
  mosaic = plots.filters_mosaic(w1, (8, 8))
  assert np.isnan(mosaic[0, 3]) and np.isnan(mosaic[:8, 9:17]).all()  # inf / inf, NaN
  assert (np.delete(mosaic[:8, :8].ravel(), 3) == 0).all()        # x / inf
  assert np.isfinite(mosaic[9:, :8]).all()
  Drawn(plots.filters_figure(w1, (8, 8)))


def test_filters_have_a_colour_scale_red_positive():
  drawn = Drawn(plots.filters_figure(np.ones((4, 64)), (8, 8)))
  tiles, bar = drawn.figure.axes
  assert bar.get_ylabel() == "weight / the unit's largest |weight|"
  assert drawn.figure.get_suptitle() == "W1: the first 4 of 4 hidden units"
  top, bottom = (drawn.colour(bar, 0.5, y) for y in (0.95, -0.95))
  assert top[0] > top[2] and bottom[2] > bottom[0]
  assert drawn.colour(tiles, 0, 0)[0] > 100 > drawn.colour(tiles, 0, 0)[2]  # weight 1: red
