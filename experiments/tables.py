"""A user's small table, through the runner and through the scikit-learn estimator,
against scikit-learn's own MLP, side by side in one run (docs/tables.md).

    python experiments/tables.py                  # the accuracy table and the CV timing
    python experiments/tables.py --seeds=1 --cv_repeats=1

First what --input_scaling=auto sees and chooses on digits, Fashion-MNIST (where
Debian's dataset-fashion-mnist is installed) and each table. Tables: scikit-learn's bundled wine, breast_cancer and iris, each split 80/20 stratified
by class (split seed 0: train_test_split(stratify=y, test_size=0.2, random_state=0)),
saved as an npz with the runner's keys. Columns, test accuracy as mean ± std over
--seeds seeds (the runner's --seed, random_state otherwise):
  runner         python experiments/train.py --dataset=npz:TABLE.npz, its defaults
  MLPClassifier  make_pipeline(mlp_jax.MLPClassifier()), its defaults
  scikit-learn   make_pipeline(StandardScaler(), sklearn MLPClassifier(max_iter=2000))
Then the selection: mlp_jax.MLPClassifierCV against GridSearchCV(make_pipeline(
StandardScaler(), MLPClassifier()), cv=5) over the same 6 learning rates on
breast_cancer, taken in turn --cv_repeats times (the first of ours compiles; JAX's
persistent cache is off): wall seconds and the chosen model's test accuracy.
"""

import io
import os
import statistics
import tempfile
import time
import warnings

from mlp_jax.base import boundary

if __name__ == "__main__":   # before any third-party import: a signal is one line
  boundary.install_stop_at_once()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
import numpy as np
from sklearn import datasets as sklearn_datasets
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier as SklearnMLP
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

os.environ["MLP_JAX_COMPILATION_CACHE"] = ""  # every compilation is counted
import mlp_jax as mj  # pylint: disable=g-import-not-at-top,wrong-import-position
from mlp_jax.data import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
from mlp_jax.data import readers  # pylint: disable=g-import-not-at-top,wrong-import-position
from mlp_jax.run import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from mlp_jax.training import config  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer("seeds", 5, "Seeds of each accuracy (0, 1, ...).", lower_bound=1)
flags.DEFINE_integer("cv_repeats", 3, "Runs of each side of the CV timing.", lower_bound=1)
FLAGS = flags.FLAGS

TABLES = ("wine", "breast_cancer", "iris")
LEARNING_RATES = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2)


def split_table(name: str) -> tuple[np.ndarray, ...]:
  """(x_train, y_train, x_test, y_test) of scikit-learn's table `name`, 80/20 stratified."""
  table = getattr(sklearn_datasets, f"load_{name}")()
  train, test = datasets.stratified_split(table.target, test_fraction=0.2, seed=0)
  return table.data[train], table.target[train], table.data[test], table.target[test]


def runner_accuracy(path: str, seed: int) -> float:
  """The runner's test accuracy on the npz at `path` with its defaults and --seed."""
  workdir = os.path.join(os.path.dirname(path), f"run_{os.path.basename(path)}_{seed}")
  result = experiment.run(config.RunConfig(
      dataset=f"npz:{path}", seed=seed, progress=False, workdir=workdir),
      log=io.StringIO().write)
  return result["test_accuracy"]


def mean_std(values: list[float]) -> str:
  return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}%"


def scaling_rule() -> None:
  """What --input_scaling=auto sees on each dataset's training rows, and chooses."""
  print("| training rows of | widest / narrowest feature range | auto chooses |\n"
        "| --- | --- | --- |")
  named = [("digits", lambda: datasets.load_digits()[0])]
  if os.path.isdir(datasets.FASHION_MNIST_DIR):
    named.append(("fashion_mnist", lambda: readers.load_idx_dir(datasets.FASHION_MNIST_DIR)[0]))
  named += [(name, lambda name=name: split_table(name)[0]) for name in TABLES]
  for name, load in named:
    rows = load()
    x = rows.reshape(len(rows), -1).astype(np.float32)
    print(f"| {name} | {datasets.range_ratio(x):.3g} | {datasets.choose_scaling(x)[0]} |")
  print()


def accuracy_table(tmp: str) -> None:
  print("| table (train rows, features, classes) | runner defaults | "
        "mlp_jax MLPClassifier() | scikit-learn MLP |\n| --- | --- | --- | --- |")
  for name in TABLES:
    x_train, y_train, x_test, y_test = split_table(name)
    path = os.path.join(tmp, f"{name}.npz")
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    seeds = range(FLAGS.seeds)
    ours = [runner_accuracy(path, s) for s in seeds]
    estimator = [make_pipeline(mj.MLPClassifier(random_state=s)).fit(x_train, y_train)
                 .score(x_test, y_test) for s in seeds]
    theirs = [make_pipeline(StandardScaler(), SklearnMLP(max_iter=2000, random_state=s))
              .fit(x_train, y_train).score(x_test, y_test) for s in seeds]
    shape = f"{len(y_train)}, {x_train.shape[1]}, {len(np.unique(y_train))}"
    print(f"| {name} ({shape}) | {mean_std(ours)} | {mean_std(estimator)} | "
          f"{mean_std(theirs)} |", flush=True)


def cv_timing() -> None:
  x_train, y_train, x_test, y_test = split_table("breast_cancer")
  ours = lambda: mj.MLPClassifierCV(  # pylint: disable=g-long-lambda
      param_grid={"learning_rate": list(LEARNING_RATES)}, cv=5).fit(x_train, y_train)
  theirs = lambda: GridSearchCV(  # pylint: disable=g-long-lambda
      make_pipeline(StandardScaler(), SklearnMLP(random_state=0)),
      {"mlpclassifier__learning_rate_init": list(LEARNING_RATES)}, cv=5).fit(
          x_train, y_train)
  times: dict[str, list[float]] = {"MLPClassifierCV": [], "GridSearchCV": []}
  fitted = {}
  for _ in range(FLAGS.cv_repeats):
    for label, fit in (("MLPClassifierCV", ours), ("GridSearchCV", theirs)):
      start = time.perf_counter()
      fitted[label] = fit()
      times[label].append(time.perf_counter() - start)
  print(f"\n6 learning rates × 5 folds on breast_cancer ({len(y_train)} train rows), "
        f"{FLAGS.cv_repeats} run(s) each, in turn:")
  for label, model in fitted.items():
    chosen = (model.best_params_ if label == "MLPClassifierCV" else
              {"learning_rate_init": model.best_params_["mlpclassifier__learning_rate_init"]})
    print(f"  {label:16s} first {times[label][0]:6.2f} s, median "
          f"{statistics.median(times[label]):6.2f} s; chose {chosen} (mean validation "
          f"{100 * model.best_score_:.2f}%), test {100 * model.score(x_test, y_test):.2f}%")
  ratio = statistics.median(times["MLPClassifierCV"]) / statistics.median(
      times["GridSearchCV"])
  print(f"  ratio of the medians: {ratio:.2f}x")


def main(argv: list[str]) -> None:
  del argv
  warnings.simplefilter("ignore", ConvergenceWarning)  # scikit-learn's max_iter=200
  scaling_rule()
  with tempfile.TemporaryDirectory() as tmp:
    accuracy_table(tmp)
  cv_timing()


if __name__ == "__main__":
  boundary.script(lambda: app.run(main, flags_parser=boundary.parse_flags))
