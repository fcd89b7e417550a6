"""Datasets on the host: loading, checking and standardising, before they go to the device.

    digits          scikit-learn's bundled 8×8 digits, stratified 80/20 split (default)
    fashion_mnist   IDX files of Debian's dataset-fashion-mnist, or --data_dir
    mnist           IDX files in --data_dir (.gz or not)
    npz:PATH        x_train, y_train, x_test, y_test (allow_pickle=False)

Every problem raises DataError with one line naming it and the fix.
"""

import importlib.util
import math
import os
from typing import Any, NamedTuple, Optional

import numpy as np

from mlp_jax.data import readers
from mlp_jax.data.readers import Arrays, DataError
from mlp_jax.data.readers import MAX_CLASSES  # pylint: disable=unused-import  (data.MAX_CLASSES)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("digits", "fashion_mnist", "mnist", "npz:PATH")
# How the inputs are scaled, x' = (x − μ) / σ with μ, σ from the training rows:
#   auto         per_feature where the features' scales differ, else global (choose_scaling)
#   global       one μ and one σ over every feature (torchvision's convention)
#   per_feature  each feature its own μ and σ (features constant in train: σ = 1)
#   none         the data as given (μ = 0, σ = 1)
SCALINGS = ("auto", "global", "per_feature", "none")
# auto: the features share a range when the widest (max − min over the training rows)
# is at most this many times the narrowest non-constant one (the ratios of digits,
# Fashion-MNIST and scikit-learn's tables: docs/tables.md).
SHARED_RANGE_RATIO = 100.0
# The largest raw pixel value of the image datasets (an 8-bit image maps 255 to it).
PIXEL_MAX = {"digits": 16.0, "fashion_mnist": 255.0, "mnist": 255.0}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


class Dataset(NamedTuple):
  """Standardised float32 inputs (N, D) and int32 labels (N,) in [0, num_classes).

  x = (x_raw.reshape(N, D) − mean) / std maps a raw example of shape `input_shape` to
  the network's input; mean and std are (D,) float32.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  x_val: Optional[np.ndarray]
  y_val: Optional[np.ndarray]
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  input_shape: tuple[int, ...]
  class_names: tuple[str, ...]
  scaling: str = "global"     # the scaling used: global, per_feature or none
  scaling_reason: str = ""    # why, when it was chosen (scaling auto)




def class_names(name: Optional[str], num_classes: int) -> tuple[str, ...]:
  """The classes' names: Fashion-MNIST's (T-shirt/top, ...), else "0", "1", ..."""
  if name == "fashion_mnist" and num_classes == len(FASHION_MNIST_CLASSES):
    return FASHION_MNIST_CLASSES
  return tuple(str(k) for k in range(num_classes))


def load_digits() -> Arrays:
  """scikit-learn's 1797 8×8 digits, split 80/20 stratified by class (split seed 0): the
  split of sklearn.model_selection.train_test_split(..., stratify=y, random_state=0).
  Read from scikit-learn's own digits.csv.gz without importing scikit-learn (its import
  costs more than the rest of a short run's start: docs/benchmarks.md)."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("the digits dataset is scikit-learn's: pip install scikit-learn.")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  table = np.loadtxt(path, delimiter=",")
  x, y = table[:, :-1], table[:, -1].astype(int)
  train, test = stratified_split(y, test_fraction=0.2, seed=0)
  return x[train], y[train], x[test], y[test]


def _largest_remainder(counts: np.ndarray, draws: int, rng: np.random.RandomState
                       ) -> np.ndarray:
  """How many of `draws` to take from each class of `counts` rows: its share, rounded
  down, and one more for the largest remainders until they add up to `draws` (ties drawn
  at random by `rng`)."""
  exact = counts / counts.sum() * draws
  taken = np.floor(exact)
  missing = int(draws - taken.sum())
  remainder = exact - taken
  for value in np.sort(np.unique(remainder))[::-1]:
    if missing <= 0:
      break
    (tied,) = np.where(remainder == value)
    chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
    taken[chosen] += 1
    missing -= len(chosen)
  return taken.astype(int)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, test rows) of labels `y`, each class split in the same proportion:
  ceil(test_fraction · N) test rows, shuffled. The same rows as scikit-learn's
  train_test_split(stratify=y, test_size=test_fraction, random_state=seed) (tested)."""
  n = len(y)
  num_test = math.ceil(test_fraction * n)
  _, label_index = np.unique(y, return_inverse=True)
  counts = np.bincount(label_index)
  by_class = np.split(np.argsort(label_index, kind="mergesort"), np.cumsum(counts)[:-1])
  rng = np.random.RandomState(seed)
  train_counts = _largest_remainder(counts, n - num_test, rng)
  test_counts = _largest_remainder(counts - train_counts, num_test, rng)
  train: list[int] = []
  test: list[int] = []
  for rows, n_train, n_test in zip(by_class, train_counts, test_counts):
    rows = rows[rng.permutation(len(rows))]
    train.extend(rows[:n_train])
    test.extend(rows[n_train:n_train + n_test])
  return rng.permutation(train), rng.permutation(test)


def _flat_inputs(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim < 2 or x.shape[0] == 0:
    raise DataError(f"{name} must be (N, ...) with N >= 1 examples, got shape {x.shape}.")
  if not (np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)):
    raise DataError(f"{name} must be a real numeric array, got dtype {x.dtype}.")
  with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf: refused below
    x = x.reshape(len(x), -1).astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise DataError(f"{name} contains NaN or inf at {int(np.sum(~np.isfinite(x)))} "
                    "places; clean the data first.")
  return x


def check_every_class_in_train(y_train: np.ndarray, num_classes: int) -> None:
  """Refuses labels 0..K-1 where a class never occurs in train: 1-based labels (1..K
  would make a phantom class 0), or a class the network could never learn."""
  missing = np.setdiff1d(np.arange(num_classes), y_train)
  if not missing.size:
    return
  if missing.tolist() == [0] and y_train.min() == 1:
    raise DataError(f"the training labels run from 1 to {num_classes - 1}, not from 0: "
                    "class 0 would be a phantom class; subtract 1 from y_train and y_test.")
  names = ", ".join(str(c) for c in missing[:10]) + (" ..." if missing.size > 10 else "")
  raise DataError(f"class {names} of 0..{num_classes - 1} never occurs in the training "
                  f"labels ({missing.size} of {num_classes} classes absent); renumber the "
                  "classes to 0..K-1 without gaps, or add training examples of each.")


def prepare(arrays: Arrays, *, validation_fraction: float = 0.0, seed: int = 0,
            scaling: str = "auto", fixed_scaling: Optional[tuple[float, float, float]] = None
            ) -> Dataset:
  """Flattens, checks, splits off validation (stratified by class), and standardises
  with TRAIN statistics, the arrays (x_train, y_train, x_test, y_test).

  x' = (x − μ) / σ, μ and σ from the (remaining) training rows only, by `scaling` (one
  of SCALINGS; auto: choose_scaling). With fixed_scaling = (s, μ, σ), constants that do
  not depend on the data, x' = (x / s − μ) / σ instead: what a differentially private run needs (a
  statistic of the private training set would leak it).
  """
  x_train, y_train, x_test, y_test = arrays
  input_shape = tuple(np.shape(x_train)[1:])
  x_train, x_test = _flat_inputs(x_train, "x_train"), _flat_inputs(x_test, "x_test")
  if x_train.shape[1] != x_test.shape[1]:
    raise DataError(f"x_train has {x_train.shape[1]} features per example but x_test "
                    f"{x_test.shape[1]}.")
  y_train = readers.labels(y_train, len(x_train), "y_train")
  y_test = readers.labels(y_test, len(x_test), "y_test")
  num_classes = int(max(y_train.max(), y_test.max(initial=0))) + 1
  if num_classes < 2:
    raise DataError("the labels name a single class; a classifier needs at least 2.")
  y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
  x_val = y_val = None
  if validation_fraction:
    if not 0 < validation_fraction < 1:
      raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    if not 0 < math.ceil(validation_fraction * len(x_train)) < len(x_train):
      raise DataError(f"validation_fraction {validation_fraction} of {len(x_train)} "
                      "training examples leaves no validation or no training data.")
    train, val = stratified_split(y_train, validation_fraction, seed)
    train, val = np.sort(train), np.sort(val)
    x_val, y_val, x_train, y_train = x_train[val], y_train[val], x_train[train], y_train[train]
  check_every_class_in_train(y_train, num_classes)
  mean, std, scaling, reason = scaling_of(x_train, scaling, fixed_scaling)
  x_train, x_test = standardize(x_train, mean, std), standardize(x_test, mean, std)
  x_val = None if x_val is None else standardize(x_val, mean, std)
  return Dataset(x_train, y_train, x_test, y_test, x_val, y_val, num_classes, mean, std,
                 input_shape, class_names(None, num_classes), scaling, reason)


def scaling_of(x_train: np.ndarray, scaling: str,
               fixed_scaling: Optional[tuple[float, float, float]] = None
               ) -> tuple[np.ndarray, np.ndarray, str, str]:
  """(μ (D,), σ (D,) float32, the scaling, why it was chosen ("" unless auto)) for the
  float32 training rows x_train (N, D); see `prepare`."""
  if scaling not in SCALINGS:
    raise DataError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}.")
  reason = ""
  if scaling == "auto" and fixed_scaling is None:
    scaling, reason = choose_scaling(x_train)
  with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused by standardize
    if fixed_scaling is not None:
      scale, mu, sigma = fixed_scaling
      center, spread = np.float32(mu * scale), np.float32(sigma * scale)
    else:
      center, spread = train_statistics(x_train, scaling)
    mean, std = (np.broadcast_to(a, x_train.shape[1:]).astype(np.float32)
                 for a in (center, spread))
  return mean, std, scaling, reason


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(x − μ) / σ of float32 rows x (N, D); DataError if that overflows float32."""
  with np.errstate(over="ignore", invalid="ignore"):
    scaled = (x - mean) / std
  if not np.all(np.isfinite(scaled)):
    raise DataError("the inputs overflow float32 when standardised (values near 1e38?); "
                    "rescale the data first.")
  return scaled


def range_ratio(x_train: np.ndarray) -> float:
  """The widest feature's range (max − min over the rows of x_train (N, D)) over the
  narrowest non-constant one's; 1 when at most one feature varies."""
  ranges = x_train.max(axis=0).astype(np.float64) - x_train.min(axis=0)
  varying = ranges[ranges > 0]
  return float(varying.max() / varying.min()) if varying.size else 1.0


def choose_scaling(x_train: np.ndarray) -> tuple[str, str]:
  """(scaling, why) for scaling auto: per_feature where the features' ranges differ by
  more than SHARED_RANGE_RATIO (a table's columns: one μ and σ would squash the narrow
  ones to nothing), else global (pixels share one range: one μ and σ keep their
  relative brightness, and a pixel that is rarely lit is not blown up)."""
  ratio = range_ratio(x_train)
  if ratio > SHARED_RANGE_RATIO:
    return "per_feature", (f"the features' ranges differ {ratio:.3g}-fold, over "
                           f"{SHARED_RANGE_RATIO:g}")
  return "global", f"the features' ranges agree within {ratio:.3g}-fold"


def stratified_folds(y: np.ndarray, num_folds: int, seed: int = 0) -> np.ndarray:
  """The fold (0 .. K−1) of each training row, (N,) int32: disjoint folds that cover
  every row, each class spread over them as evenly as it divides (its counts per fold
  differ by at most 1), the rows of a class drawn in a random order of `seed`.

  Rows sorted by (class, random key) are dealt to the folds in turn, so fold sizes also
  differ by at most 1. Every class needs at least K rows (each fold holds one out).
  """
  y = np.asarray(y)
  counts = np.bincount(y)
  if num_folds < 2 or num_folds > len(y):
    raise DataError(f"{num_folds} folds of {len(y)} training examples: use 2 to {len(y)}.")
  scarce = [c for c in range(len(counts)) if 0 < counts[c] < num_folds]
  if scarce:
    raise DataError(f"class {scarce[0]} has {counts[scarce[0]]} training examples, fewer "
                    f"than the {num_folds} folds (each must hold one out); use at most "
                    f"{counts[scarce[0]]} folds.")
  order = np.lexsort((np.random.default_rng(seed).permutation(len(y)), y))
  folds = np.empty(len(y), np.int32)
  folds[order] = np.arange(len(y)) % num_folds
  return folds


def train_statistics(x_train: np.ndarray, scaling: str) -> tuple[Any, Any]:
  """(μ, σ) of `scaling` from the training rows x_train (N, D): (D,) arrays for
  per_feature, scalars otherwise. A σ of (almost) 0 becomes 1: one below 1e-6 of the
  largest |x| it is taken over (float32 rounding of a constant), so that a column of
  scale 1 beside one of scale 1e6 is still standardised."""
  if scaling == "none":
    return np.float32(0), np.float32(1)
  axis = 0 if scaling == "per_feature" else None
  mean, std = x_train.mean(axis=axis), x_train.std(axis=axis)
  magnitude = np.max(np.abs(x_train), axis=axis)
  return mean, np.where(std > 1e-6 * magnitude, std, 1.0)


def fixed_scaling(name: str) -> tuple[float, float, float]:
  """(s, μ, σ) of x' = (x / s − μ) / σ, fixed in advance for a private run: pixel range
  s, and the published normalisation constants of Fashion-MNIST and MNIST; digits'
  pixels 0..16 map to [−1, 1]; an npz is used as it is (scale it yourself, with
  constants that do not come from the private data)."""
  mu_sigma = {"digits": (0.5, 0.5), "fashion_mnist": (0.2860, 0.3530),
              "mnist": (0.1307, 0.3081)}
  return (PIXEL_MAX[name], *mu_sigma[name]) if name in PIXEL_MAX else (1.0, 0.0, 1.0)


def load(name: str, data_dir: Optional[str] = None, *, validation_fraction: float = 0.0,
         seed: int = 0, scaling: str = "auto", private: bool = False) -> Dataset:

  """Loads dataset `name` (one of DATASETS) and prepares it; see `prepare`. private:
  never a statistic of the training data: global (and auto) scaling uses
  `fixed_scaling(name)`, none the data as given, and per_feature is refused."""
  if private and scaling == "per_feature":
    raise DataError("a private run cannot scale each feature by its train statistics "
                    "(they would leak the data); use scaling global (the dataset's "
                    "published constants) or none.")
  if name == "digits":
    arrays = load_digits()
  elif name == "fashion_mnist":
    arrays = readers.load_idx_dir(data_dir or FASHION_MNIST_DIR)
  elif name == "mnist":
    if not data_dir:
      raise DataError("dataset mnist needs --data_dir=DIR holding the four MNIST IDX "
                      "files (train-images-idx3-ubyte[.gz] ...).")
    arrays = readers.load_idx_dir(data_dir)
  elif name.startswith("npz:") and len(name) > 4:
    arrays = readers.load_npz(name[4:])
  else:
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
  fixed, reason = None, ""          # a private run: constants, never train statistics
  if private:
    if scaling == "auto":
      scaling = "global" if name in PIXEL_MAX else "none"
      reason = "a private run scales by fixed constants, never by its data"
    fixed = fixed_scaling(name) if scaling == "global" else (1.0, 0.0, 1.0)
  ds = prepare(arrays, validation_fraction=validation_fraction, seed=seed, scaling=scaling,
               fixed_scaling=fixed)
  if reason:
    ds = ds._replace(scaling_reason=reason)
  if name == "digits":  # scikit-learn gives them flat: 64 = 8×8 pixels
    ds = ds._replace(input_shape=(8, 8))
  return ds._replace(class_names=class_names(name, ds.num_classes))
