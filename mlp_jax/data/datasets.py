"""Datasets on the host: loading, checking and standardising, before they go to the device.

    digits          scikit-learn's bundled 8×8 digits, stratified 80/20 split (default)
    fashion_mnist   IDX files of Debian's dataset-fashion-mnist, or --data_dir
    mnist           IDX files in --data_dir (.gz or not)
    npz:PATH        x_train, y_train, x_test, y_test (allow_pickle=False)
    csv:TRAIN.csv[,TEST.csv]   a table with a header row; the label column is
                    --label_column (default: the last); without TEST.csv a stratified
                    20% of TRAIN.csv (seed 0) is the test split

The named datasets are rows of PRESETS, the files of FORMATS. Every problem raises
DataError with one line naming it and the fix.
"""

import importlib.util
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from mlp_jax.data import readers, tables
from mlp_jax.data.readers import Arrays, DataError
from mlp_jax.data.readers import MAX_CLASSES  # pylint: disable=unused-import  (data.MAX_CLASSES)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
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
  feature_names: tuple[str, ...] = ()   # a table's feature columns (csv:), else ()
  label_column: str = ""      # a table's label column (csv:), else ""
  test_split: str = ""        # how the test rows were chosen, where the data do not say




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
  if x.ndim < 2 or x.shape[0] == 0 or 0 in x.shape[1:]:
    raise DataError(f"{name} must be (N, ...) with N >= 1 examples of at least one "
                    f"feature, got shape {x.shape}.")
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
                 input_shape, tuple(str(k) for k in range(num_classes)), scaling, reason)


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


class Source(NamedTuple):
  """Where a dataset comes from: its name (DATASETS), the directory of its IDX files
  (mnist, fashion_mnist), and a table's label column (csv:; None: the last)."""

  name: str
  data_dir: Optional[str] = None
  label_column: Optional[str] = None


class Raw(NamedTuple):
  """A dataset as read: its arrays, and what the data say of themselves."""

  arrays: Arrays
  input_shape: Optional[tuple[int, ...]] = None     # None: x_train's own
  class_names: Optional[tuple[str, ...]] = None     # None: "0", "1", ...
  feature_names: tuple[str, ...] = ()
  label_column: str = ""
  test_split: str = ""


class Preset(NamedTuple):
  """A named dataset: how it is read (from its Source), a white pixel's raw value (an
  8-bit image maps 255 to it), the published (μ, σ) of its pixels scaled to [0, 1], a
  private run's scaling, and whether an image means the same flipped left-right (a
  shoe is a shoe; a mirrored 2 is no digit): --augment flips those."""

  read: Callable[[Source], Raw]
  pixel_max: float
  mu_sigma: tuple[float, float]
  flips: bool = False


def _mnist(source: Source) -> Raw:
  if not source.data_dir:
    raise DataError("dataset mnist needs --data_dir=DIR holding the four MNIST IDX "
                    "files (train-images-idx3-ubyte[.gz] ...).")
  return Raw(readers.load_idx_dir(source.data_dir))


PRESETS = {
    "digits": Preset(lambda _: Raw(load_digits(), (8, 8)), 16.0, (0.5, 0.5)),
    "fashion_mnist": Preset(
        lambda source: Raw(readers.load_idx_dir(source.data_dir or FASHION_MNIST_DIR),
                           class_names=FASHION_MNIST_CLASSES), 255.0, (0.2860, 0.3530),
        flips=True),
    "mnist": Preset(_mnist, 255.0, (0.1307, 0.3081)),
}
PIXEL_MAX = {name: preset.pixel_max for name, preset in PRESETS.items()}
# The stratified share of a table's rows that is its test split, without a test file.
CSV_TEST_FRACTION = 0.2


def load_csv(source: Source) -> Raw:
  """csv:TRAIN.csv[,TEST.csv]: the tables' features and labels; the classes are the
  label column's values, in numeric order where they are all numbers, else in text
  order. Without TEST.csv, a stratified CSV_TEST_FRACTION of TRAIN.csv's rows (seed 0)."""
  paths = source.name[4:].split(",")
  if len(paths) > 2 or not all(paths):
    raise DataError(f"--dataset={source.name}: give csv:TRAIN.csv or csv:TRAIN.csv,TEST.csv.")
  parts = []
  for path in paths:
    batches = list(tables.csv_rows(path, source.label_column, tables.CSV_ROWS))
    if not batches:
      raise DataError(f"{path} holds a header but no rows.")
    parts.append((np.concatenate([x for x, _ in batches]),
                   np.concatenate([y for _, y in batches])))
  label = source.label_column or tables.csv_header(paths[0])[-1]
  features = tuple(n for n in tables.csv_header(paths[0]) if n != label)
  if len(parts) == 2 and tables.csv_header(paths[1]) != tables.csv_header(paths[0]):
    raise DataError(f"{paths[1]} has other columns than {paths[0]}; give both tables the "
                    "same header.")
  labels = tables.class_names(np.concatenate([y for _, y in parts]))
  names, classes = np.unique(labels, return_inverse=True)
  try:             # numbers in numeric order (2 before 10), text in text order
    order = np.argsort(names.astype(np.float64), kind="stable")
  except ValueError:
    order = np.arange(len(names))
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  names, classes = names[order], rank[classes]
  if len(names) > readers.MAX_CLASSES:
    raise DataError(f"{paths[0]}: the label column {label!r} holds {len(names):,} "
                    f"different values, more than {readers.MAX_CLASSES} classes; is it "
                    "the label column? (--label_column)")
  (x, _), split = parts[0], ""
  y = classes[:len(x)]
  if len(parts) == 2:
    x_test, y_test = parts[1][0], classes[len(x):]
  else:
    train, test = stratified_split(y, CSV_TEST_FRACTION, seed=0)
    x, y, x_test, y_test = x[train], y[train], x[test], y[test]
    split = (f"a stratified {CSV_TEST_FRACTION:.0%} of {paths[0]} (seed 0, "
             f"{len(test)} rows; give csv:TRAIN.csv,TEST.csv for a test file)")
  return Raw((x, y, x_test, y_test), class_names=tuple(str(n) for n in names),
             feature_names=features, label_column=label, test_split=split)


# The datasets read from files, by the prefix of their name.
FORMATS = {"npz": lambda source: Raw(readers.load_npz(source.name[4:])), "csv": load_csv}
DATASETS = (*PRESETS, "npz:PATH", "csv:TRAIN.csv[,TEST.csv]")


def known(name: str) -> bool:
  """Whether `name` names a dataset: a preset, or FORMAT:PATH of a format."""
  prefix, _, path = name.partition(":")
  return name in PRESETS or (prefix in FORMATS and bool(path))


def read(source: Source) -> Raw:
  """The Raw dataset of `source`: a preset's rows, or a file's by its format."""
  if not known(source.name):
    raise DataError(f"unknown dataset {source.name!r}; choose one of {', '.join(DATASETS)}.")
  if source.name in PRESETS:
    return PRESETS[source.name].read(source)
  return FORMATS[source.name.partition(":")[0]](source)


def fixed_scaling(name: str) -> tuple[float, float, float]:
  """(s, μ, σ) of x' = (x / s − μ) / σ, fixed in advance for a private run: a preset's
  pixel range s and published normalisation constants (digits' pixels 0..16 map to
  [−1, 1]); a file is used as it is (scale it yourself, with constants that do not come
  from the private data)."""
  preset = PRESETS.get(name)
  return (preset.pixel_max, *preset.mu_sigma) if preset else (1.0, 0.0, 1.0)


def private_scaling_refusal(scaling: str, private: bool) -> Optional[str]:
  """Why a private run cannot use `scaling`, or None: the one statement of the rule that
  its inputs are never scaled by statistics of its own training data."""
  if private and scaling == "per_feature":
    return ("a private run cannot scale by statistics of its training data (they would "
            "leak it); use global (the dataset's published constants) or none.")
  return None


def load(source: "Source | str", *, validation_fraction: float = 0.0, seed: int = 0,
         scaling: str = "auto", private: bool = False) -> Dataset:
  """Loads the dataset of `source` (a Source, or its name: one of DATASETS) and prepares
  it; see `prepare`. private: never a statistic of the training data: global (and auto)
  scaling uses `fixed_scaling(name)`, none the data as given, and per_feature is refused."""
  source = Source(source) if isinstance(source, str) else source
  refusal = private_scaling_refusal(scaling, private)
  if refusal:
    raise DataError(f"scaling {scaling}: {refusal}")
  raw = read(source)
  fixed, reason = None, ""          # a private run: constants, never train statistics
  if private:
    if scaling == "auto":
      scaling = "global" if source.name in PRESETS else "none"
      reason = "a private run scales by fixed constants, never by its data"
    fixed = fixed_scaling(source.name) if scaling == "global" else (1.0, 0.0, 1.0)
  ds = prepare(raw.arrays, validation_fraction=validation_fraction, seed=seed,
               scaling=scaling, fixed_scaling=fixed)
  names = raw.class_names or ds.class_names
  if len(names) != ds.num_classes:
    names = ds.class_names
  return ds._replace(scaling_reason=reason or ds.scaling_reason,
                     input_shape=raw.input_shape or ds.input_shape, class_names=names,
                     feature_names=raw.feature_names, label_column=raw.label_column,
                     test_split=raw.test_split)
