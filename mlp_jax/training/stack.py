"""The models of a run: M = C configurations × F folds × S seeds, the metrics rows they
make, and the choice among configurations on validation.

A run is always a stack; a single model is the stack of one configuration and one seed,
and its metrics rows are flat ({"train_loss": 0.5, ...}). With several models each
metric is `NAME_mean` and `NAME_std` over the models and every model's value is under
`per_model`.
"""

from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from mlp_jax.data import datasets
from mlp_jax.training import config as config_lib
from mlp_jax.training.config import Named, RunError


class Stack(NamedTuple):
  """The models of a run: model m = configuration m // (F S), fold (m // S) % F, seed
  m % S (F = 1 without --cv_folds)."""

  # C dicts {name: value}, in grid order ([{}] without --sweep).
  configurations: list[dict[str, float]]
  # The S seeds: seed, seed + 1, ...
  seeds: list[int]
  # {name: (M,) float32}: the per-model values the program reads.
  values: dict[str, np.ndarray]
  # How the models share the program (train.STACKINGS).
  stacking: str = "vmap"
  # The F folds each configuration trains on ([None]: all of train).
  folds: Sequence[Optional[int]] = (None,)
  # (N,) int32: each training row's fold (datasets.stratified_folds).
  row_folds: Optional[np.ndarray] = None

  @property
  def models_per_configuration(self) -> int:
    """F × S: the models that share one configuration."""
    return len(self.folds) * len(self.seeds)

  @property
  def num_models(self) -> int:
    """M = C × F × S."""
    return len(self.configurations) * self.models_per_configuration

  @property
  def model_seeds(self) -> list[int]:
    """The seed of each of the M models."""
    return [s for _ in self.configurations for _ in self.folds for s in self.seeds]

  @property
  def model_folds(self) -> list[Optional[int]]:
    """The fold each of the M models holds out (None: it trains on every row)."""
    return [f for _ in self.configurations for f in self.folds for _ in self.seeds]

  def model_names(self) -> list[str]:
    """Each model's name, its index zero-padded (so that names sort as the models do)
    and what sets it apart: "model_03_learning_rate=0.002_fold=1_seed=2" (the parts a run
    varies; its index in sweep.json, which holds the whole configuration)."""
    width = len(str(self.num_models - 1))
    names = []
    for m, seed in enumerate(self.model_seeds):
      configuration = self.configurations[m // self.models_per_configuration]
      parts = [f"{k}={v:g}" for k, v in configuration.items()]
      if self.folds[0] is not None:
        parts.append(f"fold={self.model_folds[m]}")
      if len(self.seeds) > 1:
        parts.append(f"seed={seed}")
      names.append("_".join([f"model_{m:0{width}d}", *parts]))
    return names

  def per_model(self, name: str) -> np.ndarray:
    """(M,) values of a swept setting: each model's configuration's."""
    return np.array([c[name] for c in self.configurations
                     for _ in range(self.models_per_configuration)])

  def train_masks(self) -> np.ndarray:
    """(M, N) float32: 1 where model m trains on row n, 0 on the fold it holds out."""
    return np.stack([self.row_folds != f for f in self.model_folds]).astype(np.float32)

  def validation_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(indices (M, R), weights (M, R)) of each model's held-out fold, padded with
    weight 0 to the largest fold's R rows (evaluation.evaluate's rows)."""
    held_out = [np.flatnonzero(self.row_folds == f) for f in self.model_folds]
    size = max(len(rows) for rows in held_out)
    indices = np.zeros((len(held_out), size), np.int32)
    weights = np.zeros((len(held_out), size), np.float32)
    for m, rows in enumerate(held_out):
      indices[m, :len(rows)], weights[m, :len(rows)] = rows, 1
    return indices, weights


def make_stack(config: config_lib.Config) -> Stack:
  """The Stack of `config`: the grid of --sweep values, times the folds, times the seeds
  (row_folds is set once the data is loaded: with_folds)."""
  configurations = config_lib.sweep_grid(config)
  seeds = [config.seed + s for s in range(config.num_seeds)]
  stack = Stack(configurations, seeds, {}, folds=config_lib.fold_indices(config))
  values = {name: stack.per_model(name).astype(np.float32) for name in configurations[0]
            if name != "dp_target_epsilon"}  # σ comes from dp_plan
  return stack._replace(values=values)


def with_folds(stack: Stack, config: config_lib.Config, y_train: np.ndarray) -> Stack:
  """The stack with each training row's fold, for a k-fold run (--cv_folds)."""
  if not config.cv_folds:
    return stack
  try:
    row_folds = datasets.stratified_folds(y_train, config.cv_folds, config.seed)
  except datasets.DataError as e:
    raise RunError(Named("cv_folds"), f": {e}") from None
  return stack._replace(row_folds=row_folds)


Row = dict[str, Any]   # one line of metrics.jsonl


def metrics_row(epoch: int, per_model: dict[str, Any], num_models: int) -> Row:
  """The metrics.jsonl row of `epoch` from {metric: (M,)}: flat for one model, else
  NAME_mean, NAME_std and per_model."""
  arrays = {k: np.asarray(v, np.float64).reshape(num_models) for k, v in per_model.items()}
  if num_models == 1:
    return {"epoch": epoch, **{k: float(v[0]) for k, v in arrays.items()}}
  return {"epoch": epoch, **mean_std(arrays, suffix="_mean"),
          "per_model": {k: v.tolist() for k, v in arrays.items()}}


def model_values(row: Row, key: str) -> list[float]:
  """Every model's value of metric `key` in a metrics row, as a list."""
  return row["per_model"][key] if "per_model" in row else [row[key]]


def headline(row: Row, key: str) -> float:
  """The value shown for a row's metric: the one model's, or the mean over models."""
  return row[key] if key in row else row[f"{key}_mean"]


def mean_std(per_model: dict[str, Any], models: Optional[Sequence[int]] = None,
             suffix: str = "") -> dict[str, float]:
  """{metric + suffix: mean, metric_std: std} over the models `models` (default all)."""
  row = {}
  for key, given in per_model.items():
    values = np.asarray(given, np.float64)[models if models is not None else slice(None)]
    row[f"{key}{suffix}"], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
  return row


def chosen_history(history: list[Row], models: Sequence[int]) -> list[Row]:
  """The history of the models `models` alone: their values for one model, else
  {metric: mean, metric_std: std} rows (curves.png draws the std as a band)."""
  rows = []
  for row in history:
    stats = mean_std({k: np.asarray(model_values(row, k)) for k in _metrics(row)}, models)
    if len(models) == 1:
      stats = {k: v for k, v in stats.items() if not k.endswith("_std")}
    rows.append({"epoch": row["epoch"], **stats})
  return rows


def _metrics(row: Row) -> Iterable[str]:
  return row["per_model"].keys() if "per_model" in row else [
      k for k in row if k != "epoch"]


def diverged_models(row: Row) -> np.ndarray:
  """Per model: True where any loss in the row is not finite."""
  losses = [k for k in _metrics(row) if k.endswith("_loss")]
  values = np.array([model_values(row, k) for k in losses], np.float64)
  return ~np.all(np.isfinite(values), axis=0)


def choose(history: list[Row], stack: Stack) -> tuple[int, list[dict[str, Any]]]:

  """(index of the chosen configuration, ranking): configurations ranked by their mean
  validation accuracy over seeds (and folds) at the last epoch, ties broken by the
  lower mean validation loss (one whose models diverged ranks last); without a
  validation split, the only configuration."""
  last = history[-1]
  diverged = diverged_models(last)
  size = stack.models_per_configuration
  ranking = []
  for c, values in enumerate(stack.configurations):
    models = list(range(c * size, (c + 1) * size))
    entry: dict[str, Any] = {"configuration": values, "models": models,
             "diverged": bool(np.any(diverged[models]))}
    for key in ("validation_accuracy", "validation_loss"):
      if key in _metrics(last):
        stats = mean_std({key: model_values(last, key)}, models)
        entry[f"{key}_mean"], entry[f"{key}_std"] = stats[key], stats[f"{key}_std"]
    ranking.append(entry)
  if "validation_accuracy" in _metrics(last):
    ranking.sort(key=lambda e: (not e["diverged"], e["validation_accuracy_mean"],
                                -e["validation_loss_mean"]), reverse=True)
  elif len(ranking) > 1:
    raise RunError("several configurations but no validation split to choose among them.")
  return stack.configurations.index(ranking[0]["configuration"]), ranking
