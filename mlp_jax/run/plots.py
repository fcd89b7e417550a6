"""The pictures a run leaves: learning curves, the test confusion matrix, and the
first layer's weights drawn as images.

Drawn with Pillow, pixel by pixel, in DejaVu Sans (the font file matplotlib ships, read
without importing matplotlib, whose import and layout cost each run most of a second).
Each picture is a `Picture`: the image, every text written on it with its box, and the
panels' data-to-pixel maps, which is what the tests read.
"""

import functools
import importlib.util
import math
import os
from typing import IO, NamedTuple, Optional, Sequence, Union

from jax.typing import ArrayLike
import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from mlp_jax.training.stack import Row

# Where a picture is saved: a path, or a binary file (workdir.atomic_file's).
Target = Union[str, "os.PathLike[str]", IO[bytes]]
Box = tuple[int, int, int, int]  # left, top, right, bottom, in pixels

# ColorBrewer's sequential Blues and diverging RdBu (reversed: blue negative, red
# positive), as matplotlib's "Blues" and "RdBu_r" interpolate them.
BLUES = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5",
         "#08519c", "#08306b")
RD_BU_R = ("#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7",
           "#f4a582", "#d6604d", "#b2182b", "#67001f")
SPLIT_COLOURS = {"train": "#1f77b4", "validation": "#ff7f0e", "test": "#2ca02c"}
TITLE_SIZE, TITLE_LINE = 12, 18   # the title's font and line height, in pixels


def _font_files() -> list[str]:
  """DejaVu Sans where matplotlib keeps it, then where Debian does."""
  spec = importlib.util.find_spec("matplotlib")  # finds the package, imports nothing
  places = list(spec.submodule_search_locations or []) if spec else []
  return ([os.path.join(p, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf") for p in places]
          + ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"])


@functools.lru_cache(maxsize=None)
def font(size: int) -> Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]:
  """DejaVu Sans at `size` pixels (it has ε, ±, × and most scripts' letters), or
  Pillow's own font where no DejaVu Sans is installed."""
  for path in _font_files():
    if os.path.isfile(path):
      return ImageFont.truetype(path, size)
  return ImageFont.load_default(size)


def colours(values: np.ndarray, scale: Sequence[str]) -> np.ndarray:
  """values in [0, 1] (..., ) -> RGB (..., 3) uint8, linear between the colours of
  `scale`; NaN is white."""
  anchors = np.array([ImageColor.getrgb(c) for c in scale], float)
  at = np.linspace(0, 1, len(scale))
  v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1)
  shades = np.stack([np.interp(v, at, anchors[:, i]) for i in range(3)], axis=-1)
  shades[np.isnan(values)] = 255
  return np.round(shades).astype(np.uint8)


class Text(NamedTuple):
  role: str  # what it is: "title", "x ticks", "legend", ...
  text: str
  box: Box


class Panel(NamedTuple):
  """A plot's frame in pixels and the data limits it shows."""
  box: Box
  x_limits: tuple[float, float]
  y_limits: tuple[float, float]

  def pixel(self, x: float, y: float) -> tuple[float, float]:
    """Where the data point (x, y) is drawn."""
    left, top, right, bottom = self.box
    (x0, x1), (y0, y1) = self.x_limits, self.y_limits
    return (left + (x - x0) / (x1 - x0) * (right - left),
            bottom - (y - y0) / (y1 - y0) * (bottom - top))


class Picture:
  """An RGB image and what is written and plotted on it (`texts`, `panels`)."""

  def __init__(self, width: int, height: int):
    self.image = Image.new("RGB", (width, height), "white")
    self.draw = ImageDraw.Draw(self.image, "RGBA")  # RGBA: a fill's alpha blends
    self.texts: list[Text] = []
    self.panels: list[Panel] = []
    self.sizes = {"title": TITLE_SIZE, "x label": 12, "y label": 12}  # others 11

  def write(self, xy: tuple[float, float], text: str, role: str, anchor: str = "la",
            fill: str = "black") -> Box:
    """`text` placed at `xy` by Pillow's two-letter `anchor` ("mm": its middle), in its
    role's size (`sizes`). Returns its box and records it."""
    f = font(self.sizes.get(role, 11))
    self.draw.text(xy, text, fill=fill, font=f, anchor=anchor)
    box = tuple(round(v) for v in self.draw.textbbox(xy, text, font=f, anchor=anchor))
    return self._record(role, text, box)  # type: ignore[arg-type]

  def write_vertical(self, xy: tuple[float, float], text: str, role: str,
                     anchor: str = "mm") -> Box:
    """`text` read bottom to top, placed at `xy` by `anchor`, whose letters name its
    box's sides (l/m/r, then t/m/b). Returns its box and records it."""
    f = font(self.sizes.get(role, 11))
    left, top, right, bottom = (round(v) for v in f.getbbox(text))
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=f)
    mask = mask.rotate(90, expand=True)
    w, h = mask.size
    x = round(xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]])
    y = round(xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]])
    self.image.paste("black", (x, y, x + w, y + h), mask)
    return self._record(role, text, (x, y, x + w, y + h))

  def write_title(self, lines: list[str]) -> None:
    """The title's lines (title_lines), centred at the top."""
    for i, line in enumerate(lines):
      self.write((self.image.width / 2, 10 + TITLE_LINE * i), line, "title", anchor="mt")

  def _record(self, role: str, text: str, box: Box) -> Box:
    self.texts.append(Text(role, text, box))
    return box

  def written(self, role: str) -> list[str]:
    """The texts of one role, in the order written."""
    return [t.text for t in self.texts if t.role == role]

  def save(self, path: Target) -> None:
    self.image.save(path, format="PNG")


def wrap(text: str, size: int, width: int) -> list[str]:
  """`text`'s lines, each broken at spaces (a word too long for a line, between its
  letters) into lines at most `width` pixels wide."""
  def fits(line: str) -> bool:
    return font(size).getlength(line) <= width

  lines = []
  for paragraph in text.split("\n"):
    line = ""
    for word in paragraph.split(" "):
      longer = f"{line} {word}" if line else word
      if line and not fits(longer):
        lines.append(line)
        longer = word
      while not fits(longer) and len(longer) > 1:
        cut = 1
        while fits(longer[:cut + 1]):
          cut += 1
        lines.append(longer[:cut])
        longer = longer[cut:]
      line = longer
    lines.append(line)
  return lines


def title_lines(text: str, width: int) -> tuple[list[str], int]:
  """(`text` wrapped to `width` pixels in the title's size, the height it takes at the
  top of a picture)."""
  lines = wrap(text, TITLE_SIZE, width) if text else []
  return lines, 10 + TITLE_LINE * len(lines) + 10


def ticks(low: float, high: float, most: int = 6, integer: bool = False) -> list[float]:
  """Round values in [low, high] (low < high): at most `most`, 1, 2, 2.5 or 5 × 10^k
  apart (whole numbers only when `integer`)."""
  wanted = (high - low) / (most - 1)
  power = 10.0 ** math.floor(math.log10(wanted))
  steps = [m * power for m in (1, 2, 2.5, 5, 10)]
  step = next(s for s in steps if s >= wanted and not (integer and s != round(s))
              ) if not integer or wanted > 1 else 1.0
  first = math.ceil(low / step - 1e-9)
  last = math.floor(high / step + 1e-9)
  return [i * step for i in range(first, last + 1)]


def tick_label(value: float, values: Sequence[float]) -> str:
  """`value` with as many decimals as its neighbours need to read apart."""
  step = abs(values[1] - values[0]) if len(values) > 1 else 1.0
  decimals = max(0, math.ceil(-math.log10(step) - 1e-9))
  while abs(round(step, decimals) - step) > 1e-9 * step:
    decimals += 1
  return f"{value:.{decimals}f}"


def limits(values: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
  """[min, max] of the finite `values` widened by `pad` of its span each side (±0.5
  around one value; [0, 1] when none is finite: a run that diverged)."""
  finite = values[np.isfinite(values)]
  if not finite.size:
    return 0.0, 1.0
  low, high = float(np.min(finite)), float(np.max(finite))
  if high - low < 1e-12 * max(1.0, abs(high)):
    return low - 0.5, high + 0.5
  return low - pad * (high - low), high + pad * (high - low)


def _frame(picture: Picture, panel: Panel, xlabel: str, ylabel: str) -> None:
  """The panel's frame, grid, ticks (whole numbers across) and their labels, and the
  axis labels."""
  left, top, right, bottom = panel.box
  xs = ticks(*panel.x_limits, integer=True)
  ys = ticks(*panel.y_limits)
  for x in xs:
    px = round(panel.pixel(x, 0)[0])
    picture.draw.line([(px, top), (px, bottom)], fill=(0, 0, 0, 28))
    picture.draw.line([(px, bottom), (px, bottom + 4)], fill="black")
    picture.write((px, bottom + 6), tick_label(x, xs), "x ticks", anchor="mt")
  widest = 0
  for y in ys:
    py = round(panel.pixel(0, y)[1])
    picture.draw.line([(left, py), (right, py)], fill=(0, 0, 0, 28))
    picture.draw.line([(left - 4, py), (left, py)], fill="black")
    box = picture.write((left - 6, py), tick_label(y, ys), "y ticks", anchor="rm")
    widest = max(widest, box[2] - box[0])
  picture.draw.rectangle(panel.box, outline="black")
  picture.write(((left + right) / 2, bottom + 24), xlabel, "x label", anchor="mt")
  picture.write_vertical((left - 12 - widest, (top + bottom) / 2), ylabel, "y label",
                         anchor="rm")


def _legend(picture: Picture, panel: Panel, entries: list[tuple[str, str]],
            points: list[tuple[float, float]]) -> None:
  """(colour, label) entries in the panel's corner that covers the fewest drawn points
  (upper right first on a tie)."""
  width = 36 + max(round(font(11).getlength(label)) for _, label in entries)
  height = 8 + 18 * len(entries)
  left, top, right, bottom = panel.box
  corners = [(right - 8 - width, top + 8), (right - 8 - width, bottom - 8 - height),
             (left + 8, top + 8), (left + 8, bottom - 8 - height)]

  def covered(corner: tuple[int, int]) -> int:
    x, y = corner
    return sum(x <= px <= x + width and y <= py <= y + height for px, py in points)
  x, y = min(corners, key=covered)
  picture.draw.rectangle((x, y, x + width, y + height), fill=(255, 255, 255, 215),
                         outline=(0, 0, 0, 80))
  for i, (colour, label) in enumerate(entries):
    cy = y + 4 + 18 * i + 9
    picture.draw.line([(x + 6, cy), (x + 26, cy)], fill=colour, width=2)
    picture.write((x + 32, cy), label, "legend", anchor="lm")


def curves_figure(history: Sequence[Row], label_smoothing: float = 0.0,
                  title: Optional[str] = None) -> Picture:
  """Loss and accuracy per epoch (integer ticks), train vs test (and validation when
  present); rows with `_std` keys (several models) are drawn as the mean with a ± std
  band. `title`: what was trained (reports.run_title), above the plots.

  The train loss is the training objective: with label smoothing ε > 0 it is taken
  against smoothed targets and sits above the plain loss of the other splits, so its
  label says so. With DP-SGD (an `epsilon` in the rows) the title gives the last ε and
  says that the train curves are not private.
  """
  width = 1000
  epochs = np.array([row["epoch"] for row in history], float)
  lines = [title] if title else []
  if history and "epsilon" in history[-1]:
    lines.append(f"DP-SGD: ε = {history[-1]['epsilon']:.2f} after epoch {int(epochs[-1])}; "
                 "the train curves are computed from the private batches without noise "
                 "and are not covered by ε")
  heading, top = title_lines("\n".join(lines), width - 20)
  picture = Picture(width, top + 390)
  picture.write_title(heading)
  for p, metric in enumerate(("loss", "accuracy")):
    series = []
    for split in SPLIT_COLOURS:
      key = f"{split}_{metric}"
      if history and key in history[0]:
        mean = np.array([row[key] for row in history], float)
        std = np.array([row.get(f"{key}_std", 0.0) for row in history], float)
        label = split
        if split == "train" and metric == "loss" and label_smoothing:
          label = f"train (label smoothing {label_smoothing:g})"
        series.append((SPLIT_COLOURS[split], label, mean, std, f"{key}_std" in history[0]))
    values = np.concatenate([np.concatenate([m - s, m + s]) for _, _, m, s, _ in series]
                            ) if series else np.zeros(1)
    panel = Panel((p * width // 2 + 80, top, (p + 1) * width // 2 - 20, top + 390 - 50),
                  limits(epochs) if len(epochs) else (0.5, 1.5), limits(values))
    picture.panels.append(panel)
    _frame(picture, panel, "epoch", metric)
    points = [pixel for colour, _, mean, std, band in series
              for pixel in _draw_series(picture, panel, epochs, colour, mean,
                                        std if band else None)]
    if series:
      _legend(picture, panel, [(c, label) for c, label, *_ in series], points)
  return picture


def _draw_series(picture: Picture, panel: Panel, epochs: np.ndarray, colour: str,
                 mean: np.ndarray, std: Optional[np.ndarray]) -> list[tuple[float, float]]:
  """One split's curve: its points joined, with a ± std band when `std` is given (several
  models), broken where a value is not finite (a run that diverged). Returns pixels
  along it, where a legend would cover it."""
  finite = np.isfinite(mean) & (np.isfinite(std) if std is not None else True)
  pixels = []
  for run in np.split(np.arange(len(epochs)), np.flatnonzero(~finite)):
    run = run[finite[run]]
    if std is not None and len(run) > 1:
      picture.draw.polygon([panel.pixel(e, v) for e, v in zip(epochs[run], (mean + std)[run])]
                           + [panel.pixel(e, v) for e, v in
                              zip(epochs[run][::-1], (mean - std)[run][::-1])],
                           fill=ImageColor.getrgb(colour) + (50,))
    line = [panel.pixel(e, v) for e, v in zip(epochs[run], mean[run])]
    if len(line) > 1:
      picture.draw.line(line, fill=colour, width=2, joint="curve")
    for x, y in line:
      picture.draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    pixels += [(x0 + t * (x1 - x0), y0 + t * (y1 - y0))  # along each segment
               for (x0, y0), (x1, y1) in zip(line, line[1:] or line)
               for t in np.linspace(0, 1, 8)]
  return pixels


def plot_curves(history: Sequence[Row], path: Target, label_smoothing: float = 0.0,
                title: Optional[str] = None) -> None:
  """curves_figure saved at `path`."""
  curves_figure(history, label_smoothing, title).save(path)


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int
                     ) -> np.ndarray:
  """counts[i, j] = number of examples of class i predicted as j, (K, K)."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def confusion_figure(counts: np.ndarray, class_names: Optional[Sequence[str]] = None,
                     model: Optional[str] = None) -> Picture:
  """The confusion matrix as a heat map with its counts written in, true classes down,
  predicted across, at least 400 pixels wide so its title fits. Ticks carry the class
  names when given (Fashion-MNIST's T-shirt/top, ...), upright when they fit under their
  column; `model` names the model it shows (e.g. "model 3, seed 0")."""
  k = counts.shape[0]
  names = [str(c) for c in (class_names or range(k))]
  cell = max(24, min(60, 480 // k))
  count_size = next((s for s in range(11, 5, -1)
                     if font(s).getlength(str(counts.max())) <= cell - 4), 6)
  longest = max(font(11).getlength(n) for n in names)
  upright = longest <= cell - 4
  title, top = title_lines(f"test confusion{', ' + model if model else ''}\n{counts.trace()} / "
                           f"{counts.sum()} right", 380)
  left = 10 + 16 + 8 + math.ceil(longest) + 8
  below = 8 + (14 if upright else math.ceil(longest)) + 8 + 16 + 10
  width = max(400, left + k * cell + 20)
  left += (width - (left + k * cell + 20)) // 2
  picture = Picture(width, top + k * cell + below)
  picture.sizes["counts"] = count_size
  picture.write_title(title)
  shade = colours(counts / max(counts.max(), 1), BLUES)
  cells = Image.fromarray(shade).resize((k * cell, k * cell), Image.Resampling.NEAREST)
  picture.image.paste(cells, (left, top))
  for i in range(k):
    for j in range(k):
      picture.write((left + j * cell + cell / 2, top + i * cell + cell / 2), str(counts[i, j]),
                    "counts", anchor="mm",
                    fill="white" if counts[i, j] > counts.max() / 2 else "black")
  bottom = top + k * cell
  for i, name in enumerate(names):
    centre = left + i * cell + cell / 2
    if upright:
      picture.write((centre, bottom + 8), name, "x ticks", anchor="mt")
    else:
      picture.write_vertical((centre, bottom + 8), name, "x ticks", anchor="mt")
    picture.write((left - 8, top + i * cell + cell / 2), name, "y ticks", anchor="rm")
  picture.write((left + k * cell / 2, picture.image.height - 10), "predicted", "x label",
                anchor="mb")
  picture.write_vertical((10, top + k * cell / 2), "true", "y label", anchor="lm")
  return picture


def plot_confusion(counts: np.ndarray, path: Target,
                   class_names: Optional[Sequence[str]] = None, model: Optional[str] = None
                   ) -> None:
  """confusion_figure saved at `path`."""
  confusion_figure(counts, class_names, model).save(path)


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
                   ) -> Picture:
  """filters_mosaic drawn: what each hidden unit responds to. Red is positive, blue
  negative, each unit scaled to its own largest |weight|, with the colour scale."""
  mosaic = filters_mosaic(w1, input_shape, max_units)
  units = min(np.shape(w1)[0], max_units)
  scale = max(1, 520 // max(mosaic.shape))
  tiles = Image.fromarray(colours((mosaic + 1) / 2, RD_BU_R)).resize(
      (mosaic.shape[1] * scale, mosaic.shape[0] * scale), Image.Resampling.NEAREST)
  title, top = title_lines(f"W1: the first {units} of {np.shape(w1)[0]} hidden units", 380)
  label = "weight / the unit's largest |weight|"
  bar_height = max(tiles.height, round(font(11).getlength(label)) + 10)
  beside = 20 + 18 + 100  # the gap, the colour bar, its tick labels and its label
  width = max(400, 20 + tiles.width + beside + 20)
  left = (width - tiles.width - beside) // 2
  picture = Picture(width, top + bar_height + 15)
  picture.write_title(title)
  picture.image.paste(tiles, (left, top))
  bar_left = left + tiles.width + 20
  bar = colours(np.linspace(1, 0, bar_height)[:, None].repeat(18, axis=1), RD_BU_R)
  picture.image.paste(Image.fromarray(bar), (bar_left, top))
  panel = Panel((bar_left, top, bar_left + 18, top + bar_height - 1), (0, 1), (-1, 1))
  picture.panels.append(panel)
  picture.draw.rectangle(panel.box, outline="black")
  marks = [-1.0, -0.5, 0.0, 0.5, 1.0]
  widest = 0
  for v in marks:
    y = round(panel.pixel(0, v)[1])
    picture.draw.line([(bar_left + 18, y), (bar_left + 22, y)], fill="black")
    box = picture.write((bar_left + 24, y), tick_label(v, marks), "colour ticks", anchor="lm")
    widest = max(widest, box[2] - box[0])
  picture.write_vertical((bar_left + 24 + widest + 6, top + bar_height / 2), label,
                         "colour scale", anchor="lm")
  return picture


def is_image(input_shape: Sequence[int], in_dim: int) -> bool:
  """True when the inputs are images: input_shape (h, w) with h·w = D."""
  return len(input_shape) == 2 and input_shape[0] * input_shape[1] == in_dim


def plot_filters(w1: ArrayLike, input_shape: Sequence[int], path: Target) -> bool:
  """filters_figure saved at `path` (a path or a binary file); returns False (and writes
  nothing) unless the input is an image (is_image)."""
  if not is_image(input_shape, np.shape(w1)[1]):
    return False
  filters_figure(w1, input_shape).save(path)
  return True
