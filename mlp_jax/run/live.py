"""What a run shows while it trains: TensorBoard event files and a redrawn curves.png.

    WORKDIR/tensorboard/            every number of each metrics.jsonl row, tag = its
                                    name (train_loss, validation_accuracy, epsilon, ...)
    WORKDIR/tensorboard/model_M_.../ several models: model M's values (the row's
                                    per_model), under the same tags, so TensorBoard
                                    draws the models over each other; the name says
                                    M (zero-padded: the names sort as the models do)
                                    and its swept values, fold and seed
                                    (Stack.model_names)

    tensorboard --logdir=WORKDIR

Written by mlp_jax.run.events (no TensorFlow, torch or protobuf), through to the file every
epoch. curves.png is redrawn during the run at most every REDRAW_SECONDS (its cost:
docs/benchmarks.md, "Live logging"), and at the end by reports.write_outputs as always.
"""

import os
import time
from typing import Callable, Sequence

from mlp_jax.run import events
from mlp_jax.training.stack import Row

REDRAW_SECONDS = 30.0


def scalars(row: Row) -> dict[str, float]:
  """{tag: value} of a metrics row's numbers (not the epoch, not per_model)."""
  return {k: float(v) for k, v in row.items()
          if k not in ("epoch", "per_model") and isinstance(v, (int, float))
          and not isinstance(v, bool)}


def model_scalars(row: Row) -> list[dict[str, float]]:
  """[{tag: value} of model m] of a several-model row's per_model values."""
  per_model = row.get("per_model", {})
  num_models = len(next(iter(per_model.values()), []))
  return [{k: float(v[m]) for k, v in per_model.items()} for m in range(num_models)]


class LiveLog:
  """The event files of a run's workdir, one writer per directory (the models' under
  `model_names`), and the timed redraw of curves.png by `draw_curves(history)`;
  `close()` at the end."""

  def __init__(self, workdir: str, draw_curves: Callable[[list[Row]], None],
               model_names: Sequence[str]):
    self.logdir = os.path.join(workdir, "tensorboard")
    self._model_names = list(model_names)
    self._writers: dict[str, events.EventFile] = {}
    self._draw_curves = draw_curves
    self._drawn = time.monotonic()

  def _writer(self, subdir: str) -> events.EventFile:
    if subdir not in self._writers:
      self._writers[subdir] = events.EventFile(os.path.join(self.logdir, subdir))
    return self._writers[subdir]

  def append(self, row: Row, history: list[Row]) -> None:
    """Writes the epoch's row, and redraws curves.png if it is due."""
    step = row["epoch"]
    self._writer("").add(step, scalars(row))
    for m, values in enumerate(model_scalars(row)):
      self._writer(self._model_names[m]).add(step, values)
    if time.monotonic() - self._drawn >= REDRAW_SECONDS:
      self._draw_curves(history)
      self._drawn = time.monotonic()

  def close(self) -> None:
    """Flushes and closes every event file."""

    for writer in self._writers.values():
      writer.close()
    self._writers = {}
