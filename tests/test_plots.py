"""The pictures a run leaves: nothing cut off or written over, each labelled so it
reads right, the data where the axes say it is."""

import itertools

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
            (FASHION * 3)[:k] if named else None, "model 12, seed 3, fold 4"))
       for k, named in itertools.product((2, 3, 10, 26), (False, True))},
    **{f"filters, {units} units of {h}×{w}": (
        lambda units=units, h=h, w=w: plots.filters_figure(
            np.random.default_rng(0).normal(size=(units, h * w)), (h, w)))
       for units, (h, w) in itertools.product((1, 5, 64, 256), ((8, 8), (28, 28)))},
}


@pytest.mark.parametrize("name", PICTURES)
def test_every_text_is_inside_the_picture_and_none_overlaps_another(name):
  picture = PICTURES[name]()
  width, height = picture.image.size
  assert 300 <= width <= 1200 and 200 <= height <= 1200
  for text in picture.texts:
    left, top, right, bottom = text.box
    assert 0 <= left < right <= width and 0 <= top < bottom <= height, text
  for (a, b) in itertools.combinations(picture.texts, 2):
    overlap = (min(a.box[2], b.box[2]) > max(a.box[0], b.box[0])
               and min(a.box[3], b.box[3]) > max(a.box[1], b.box[1]))
    assert not overlap, (a, b)
  for title, panel in itertools.product(picture.texts, picture.panels):
    assert title.role != "title" or title.box[3] < panel.box[1], (title, panel)


def test_a_picture_is_saved_as_a_png_of_its_size(tmp_path):
  picture = PICTURES["confusion, K=3, named"]()
  picture.save(tmp_path / "c.png")
  with Image.open(tmp_path / "c.png") as saved:
    assert saved.format == "PNG" and saved.size == picture.image.size


def test_confusion_names_the_classes_counts_and_model():
  counts = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
  picture = plots.confusion_figure(counts, FASHION[:3], model="model 4, seed 1")
  assert picture.written("x ticks") == picture.written("y ticks") == list(FASHION[:3])
  assert picture.written("counts") == [str(c) for c in counts.ravel()]
  assert picture.written("title") == ["test confusion, model 4, seed 1", "21 / 25 right"]
  assert plots.confusion_figure(counts).written("x ticks") == ["0", "1", "2"]


def test_confusion_shades_each_cell_by_its_count():
  counts = np.array([[9, 0], [3, 6]])
  picture = plots.confusion_figure(counts)
  cells = [t.box for t in picture.texts if t.role == "counts"]
  # A pixel of each cell beside its number: the darker, the larger the count.
  shade = [sum(picture.image.getpixel((box[0] - 3, (box[1] + box[3]) // 2)))
           for box in cells]
  assert shade[0] < shade[3] < shade[2] < shade[1]
  assert shade[1] == 3 * 255 - sum((255 - 0xf7, 255 - 0xfb, 0))  # Blues' first colour


def test_the_legend_names_the_splits_and_the_smoothed_train_loss():
  picture = plots.curves_figure(history(2), label_smoothing=0.2)
  assert picture.written("legend") == ["train (label smoothing 0.2)", "test",
                                       "train", "test"]
  assert plots.curves_figure(history(2)).written("legend") == ["train", "test"] * 2
  assert picture.written("y label") == ["loss", "accuracy"]


def test_several_seeds_are_drawn_as_a_mean_with_a_band():
  rows = [{"epoch": e, "test_accuracy": 0.9, "test_accuracy_std": 0.05, "test_loss": 0.3,
           "test_loss_std": 0.01} for e in (1, 2, 3)]
  picture = plots.curves_figure(rows)
  accuracy = picture.panels[1]
  assert accuracy.y_limits[0] < 0.85 and 0.95 < accuracy.y_limits[1]

  def colour(y):
    return picture.image.getpixel(tuple(round(v) for v in accuracy.pixel(2.5, y)))
  inside, outside = colour(0.925), colour(0.953)
  assert outside == (255, 255, 255) and inside != outside
  assert inside[1] > inside[0] and inside[1] > inside[2]  # the test split's green, faint
  assert colour(0.875) == inside


def test_each_curve_passes_through_its_values():
  rows = history(5)
  picture = plots.curves_figure(rows)
  loss = picture.panels[0]
  for row in rows:
    x, y = (round(v) for v in loss.pixel(row["epoch"], row["test_loss"]))
    assert picture.image.getpixel((x, y)) == (0x2c, 0xa0, 0x2c)  # the test split's marker


def test_the_legend_sits_where_it_covers_no_point_of_the_curves():
  rows = history(10)
  picture = plots.curves_figure(rows)
  legends = [t.box for t in picture.texts if t.role == "legend"]
  for panel, metric, legend in zip(picture.panels, ("loss", "accuracy"),
                                   (legends[:2], legends[2:])):
    left, top = min(b[0] for b in legend), min(b[1] for b in legend)
    right, bottom = max(b[2] for b in legend), max(b[3] for b in legend)
    for row, split in itertools.product(rows, ("train", "test")):
      x, y = panel.pixel(row["epoch"], row[f"{split}_{metric}"])
      assert not (left - 40 <= x <= right and top <= y <= bottom), (metric, row["epoch"])


def test_a_diverged_run_is_drawn_where_its_values_are_finite():
  picture = plots.curves_figure(DIVERGED)
  loss = picture.panels[0]
  assert loss.y_limits[0] < 0.5 / 7 - 0.1 and 1.0 < loss.y_limits[1] < 1.2
  for row in DIVERGED:
    for split, colour in (("train", (0x1f, 0x77, 0xb4)), ("test", (0x2c, 0xa0, 0x2c))):
      if np.isfinite(row[f"{split}_loss"]):
        x, y = (round(v) for v in loss.pixel(row["epoch"], row[f"{split}_loss"]))
        assert picture.image.getpixel((x, y)) == colour, (split, row["epoch"])


def test_curves_say_what_was_trained_with_integer_epochs_and_the_dp_caveat():
  rows = history(7, epsilon=0.5)
  picture = plots.curves_figure(rows, title="digits: a 64-256-10 MLP, lr=0.001")
  title = " ".join(picture.written("title"))
  assert title.startswith("digits: a 64-256-10 MLP, lr=0.001 DP-SGD: ε = 3.50 after epoch 7")
  assert title.endswith("not covered by ε")
  epochs = picture.written("x ticks")
  assert epochs and all(int(e) in range(1, 8) for e in epochs)
  plain = [{k: v for k, v in row.items() if k != "epsilon"} for row in rows]
  assert plots.curves_figure(plain).written("title") == []


def test_a_long_title_is_broken_into_lines_that_fit():
  picture = plots.curves_figure(history(3), title=LONG_TITLE)
  lines = picture.written("title")
  assert len(lines) >= 3 and " ".join(lines) == LONG_TITLE.replace("\n", " ")


@pytest.mark.parametrize("low, high, integer", [
    (0.5, 1.5, True), (0.3, 30.7, True), (0.0, 1.0, False), (0.845, 0.955, False),
    (-3e-5, 7e-5, False), (12.0, 9876.0, False), (0.5, 200.5, True)])
def test_ticks_are_round_evenly_spaced_and_within_the_limits(low, high, integer):
  values = plots.ticks(low, high, integer=integer)
  assert 1 <= len(values) <= 6 and all(low <= v <= high for v in values)
  steps = np.diff(values)
  np.testing.assert_allclose(steps, steps[0] if len(steps) else 0)
  labels = [plots.tick_label(v, values) for v in values]
  np.testing.assert_allclose([float(label) for label in labels], values, atol=1e-12)
  if integer:
    assert all(float(label).is_integer() and "." not in label for label in labels)


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
  plots.filters_figure(w1, (8, 8))


def test_filters_have_a_colour_scale_red_positive():
  picture = plots.filters_figure(np.ones((4, 64)), (8, 8))
  assert picture.written("colour scale") == ["weight / the unit's largest |weight|"]
  assert picture.written("title") == ["W1: the first 4 of 4 hidden units"]
  bar = picture.panels[0]
  top, bottom = (picture.image.getpixel(tuple(round(v) for v in bar.pixel(0.5, y)))
                 for y in (0.95, -0.95))
  assert top[0] > top[2] and bottom[2] > bottom[0]


def test_the_font_has_the_letters_the_titles_use():
  font = plots.font(12)
  missing = font.getmask("\uffff").getbbox()
  for letter in "ε±×·":
    assert font.getmask(letter).getbbox() != missing, letter
