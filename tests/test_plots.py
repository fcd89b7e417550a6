"""The pictures a run leaves: nothing cut off."""

from matplotlib.backends.backend_agg import FigureCanvasAgg
import numpy as np
import pytest

from mlp_jax import plots


@pytest.mark.parametrize("k", [2, 3, 10])
def test_confusion_title_fits_inside_the_figure(k):
  counts = np.full((k, k), 99_999)
  fig = plots.confusion_figure(counts)
  renderer = FigureCanvasAgg(fig).get_renderer()
  title = fig.axes[0].title
  assert f"{counts.trace()} / {counts.sum()} right" in title.get_text()
  box, frame = title.get_window_extent(renderer), fig.bbox
  assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
