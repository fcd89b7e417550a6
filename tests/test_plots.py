"""The pictures a run leaves: nothing cut off, each labelled so it reads right."""

from matplotlib.backends.backend_agg import FigureCanvasAgg
import numpy as np
import pytest

from mlp_jax.run import plots


@pytest.mark.parametrize("k", [2, 3, 10])
def test_confusion_title_fits_inside_the_figure(k):
  counts = np.full((k, k), 99_999)
  fig = plots.confusion_figure(counts)
  renderer = FigureCanvasAgg(fig).get_renderer()
  title = fig.axes[0].title
  assert f"{counts.trace()} / {counts.sum()} right" in title.get_text()
  box, frame = title.get_window_extent(renderer), fig.bbox
  assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1


def test_confusion_names_the_classes():
  names = ("T-shirt/top", "Trouser", "Pullover")
  fig = plots.confusion_figure(np.eye(3, dtype=int), names)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == list(names)
  assert [t.get_text() for t in ax.get_yticklabels()] == list(names)


def test_smoothed_train_loss_is_labelled_as_such(tmp_path):
  history = [{"epoch": e, "train_loss": 1.0, "test_loss": 0.5, "train_accuracy": 0.9,
              "test_accuracy": 0.9} for e in (1, 2)]
  fig = plots.curves_figure(history, label_smoothing=0.2)
  loss_axes = fig.axes[0]
  assert [t.get_text() for t in loss_axes.get_legend().get_texts()] == [
      "train (label smoothing 0.2)", "test"]
  plain = plots.curves_figure(history)
  assert [t.get_text() for t in plain.axes[0].get_legend().get_texts()] == ["train", "test"]


def test_filters_are_drawn_for_square_images_only(tmp_path):
  w1 = np.arange(5 * 64, dtype=float).reshape(5, 64)
  assert plots.plot_filters(w1, (8, 8), tmp_path / "f.png")
  assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
  image = plots.filters_figure(w1, (8, 8)).axes[0].get_images()[0].get_array()
  assert image.shape == (2 * 9 - 1, 3 * 9 - 1)          # 5 units: 2 rows of 3, 1-pixel gaps
  np.testing.assert_allclose(image[:8, :8], w1[0].reshape(8, 8) / w1[0].max())
  assert not plots.plot_filters(w1[:, :6], (6,), tmp_path / "g.png")
  assert not (tmp_path / "g.png").exists()


def test_several_seeds_are_drawn_as_a_mean_with_a_band():
  history = [{"epoch": e, "test_accuracy": 0.9, "test_accuracy_std": 0.05, "test_loss": 0.3,
              "test_loss_std": 0.01} for e in (1, 2, 3)]
  ax = plots.curves_figure(history).axes[1]
  (band,) = ax.collections
  ys = band.get_paths()[0].vertices[:, 1]
  assert np.isclose(ys.min(), 0.85) and np.isclose(ys.max(), 0.95)


def test_curves_say_what_was_trained_with_integer_epochs_and_the_dp_caveat():
  history = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5, "epsilon": 0.5 * e}
             for e in range(1, 8)]
  fig = plots.curves_figure(history, title="digits: a 64-256-10 MLP, lr=0.001")
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert title.startswith("digits: a 64-256-10 MLP, lr=0.001\nDP-SGD: ε = 3.50 after epoch 7")
  assert "not covered by ε" in title
  FigureCanvasAgg(fig).draw()
  for ax in fig.axes:
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 7]
    assert ticks and all(float(t).is_integer() for t in ticks)
  plain = [{k: v for k, v in row.items() if k != "epsilon"} for row in history]
  assert plots.curves_figure(plain)._suptitle is None  # pylint: disable=protected-access


def test_confusion_names_its_model_and_filters_have_a_colour_scale():
  fig = plots.confusion_figure(np.eye(3, dtype=int), model="model 4, seed 1")
  assert fig.axes[0].title.get_text().startswith("test confusion, model 4, seed 1\n3 / 3")
  fig = plots.filters_figure(np.ones((4, 64)), (8, 8))
  colorbar, = [ax for ax in fig.axes if ax.get_ylabel()]
  assert colorbar.get_ylabel() == "weight / the unit's largest |weight|"
