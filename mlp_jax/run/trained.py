"""A finished run as a model for new data: its params and the preprocessing that maps a
raw example to the network's input, saved together in WORKDIR/params.npz.

    model = mj.load("WORKDIR")       # or mj.load("WORKDIR/params.npz")
    model.predict_proba(x_raw)       # raw inputs (N, *input_shape) or (N, D) -> p (N, K)
    model.predict(x_raw)             # -> classes (N,), int32

    x = (x_raw.reshape(N, D) − mean) / std,  p = softmax(W2 f(W1 x + b1) + b2)

params.npz loads with numpy alone: w1, b1, w2, b2 and input_mean, input_std (D,),
input_shape, class_names, dataset, pixel_max (the raw value of a white pixel; 0 when
the inputs are not images), activation (f's name; a file without it is ReLU's, as every
run before --activation).
"""

import contextlib
import csv
import os
from typing import IO, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from mlp_jax.base import budget, files, options
from mlp_jax.base.errors import escaped
from mlp_jax.core import prediction
from mlp_jax.core.model import Params
from mlp_jax.data import datasets, readers, tables

PREPROCESSING = ("input_mean", "input_std", "input_shape", "class_names", "dataset",
                 "pixel_max")
# What later versions added, and what a file without it holds.
LATER = {"activation": "relu", "feature_names": (), "label_column": ""}


class TrainedModel(NamedTuple):
  """Params (W1 (H, D), b1, W2 (K, H), b2) with the preprocessing of their run."""

  params: Params
  mean: np.ndarray       # (D,) float32
  std: np.ndarray        # (D,) float32
  input_shape: tuple[int, ...]   # one raw example, e.g. (28, 28) or (D,)
  class_names: tuple[str, ...]   # K names
  dataset: str
  pixel_max: float       # raw value of a white pixel; 0: not an image dataset
  activation: str = "relu"   # f of the hidden layer (options.ACTIVATIONS)
  feature_names: tuple[str, ...] = ()   # a table's feature columns, found by name
  label_column: str = ""                # a table's label column ("": none)

  def __repr__(self) -> str:
    """One line: the network's shape and what it was trained on, not its arrays."""
    (h, d), k = self.params.w1.shape, self.params.w2.shape[0]
    names = ", ".join(self.class_names[:4]) + (", ..." if k > 4 else "")
    return (f"TrainedModel({d}-{h}-{k} {self.activation} MLP, dataset={self.dataset!r}, "
            f"input_shape={tuple(self.input_shape)}, classes: {names})")

  def inputs(self, x_raw: ArrayLike, names: Optional[Sequence[str]] = None) -> ArrayLike:
    """Raw examples (N, *input_shape) or (N, D) -> the network's inputs (N, D) in the
    params' dtype (prediction.network_inputs: a row not finite there is refused)."""
    x_raw = x_raw if isinstance(x_raw, jax.core.Tracer) else np.asarray(x_raw)
    d = self.mean.shape[0]
    if x_raw.ndim < 1 or x_raw.shape[1:] not in (tuple(self.input_shape), (d,)):
      raise ValueError(f"inputs of shape {x_raw.shape} do not fit this model: give "
                       f"(N, {', '.join(map(str, self.input_shape))}) or (N, {d}), raw "
                       f"values as in the {self.dataset} training data.")
    return prediction.network_inputs(x_raw.reshape(x_raw.shape[0], d), self.mean,
                                     self.std, self.params.w1.dtype, names)

  def predict_proba(self, x_raw: ArrayLike) -> Array:
    """p = softmax(z2) (N, K) of raw examples (N, *input_shape) or (N, D); jit-able
    (mlp_jax.core.prediction: its rule for inputs that are not finite)."""
    return prediction.probabilities(self.params, self.inputs(x_raw), self.activation)

  def predict(self, x_raw: ArrayLike) -> Array:
    """The most probable class (N,) int32 of raw examples; jit-able (prediction.classes:
    under jit a row that is not finite gets -1)."""
    return prediction.classes(self.predict_proba(x_raw))


def save(path: Union[str, IO[bytes]], params: Params, inputs: datasets.Dataset, dataset: str,
         activation: str) -> None:
  """Writes params.npz (`path`: a path or a binary file): the params (W1 (H, D), ...),
  their activation and the preprocessing of TrainedModel, from `inputs`, the run's
  datasets.Dataset (its mean, std (D,), input_shape and class_names; its arrays are not
  needed)."""
  arrays: dict[str, Any] = {k: np.asarray(v) for k, v in params._asdict().items()}
  np.savez(path, **arrays, input_mean=np.asarray(inputs.mean, np.float32),
           input_std=np.asarray(inputs.std, np.float32),
           input_shape=np.asarray(inputs.input_shape, np.int64),
           class_names=np.asarray(inputs.class_names, str), dataset=np.asarray(dataset, str),
           input_scaling=np.asarray(inputs.scaling, str),
           pixel_max=np.float64(datasets.PIXEL_MAX.get(dataset, 0.0)),
           activation=np.asarray(activation, str),
           feature_names=np.asarray(inputs.feature_names, str),
           label_column=np.asarray(inputs.label_column, str))


def load(path: str) -> TrainedModel:
  """The TrainedModel of a workdir (or of its params.npz; of a k-fold selection's
  workdir, its refit's); ValueError, one line, if it is not there or not a params.npz
  this version writes."""
  file = os.path.join(path, "params.npz") if os.path.isdir(path) else path
  refit = os.path.join(path, "refit", "params.npz")
  if os.path.isdir(path) and not os.path.exists(file) and os.path.exists(refit):
    file = refit
  if not os.path.isfile(file):
    raise ValueError(f"no params.npz at {file}: give the --workdir of a finished run.")
  try:
    with files.NpzArchive(file, budget.memory_budget()) as npz:  # every header checked against its real size
      arrays = {name: npz.read(name) for name in (*Params._fields, *PREPROCESSING, *LATER)
                if name in npz.names}          # what a model needs, no other member
  except ValueError as e:
    reason = str(e).removeprefix(f"{file}: ").removeprefix(f"{file} is ")
    raise ValueError(f"{file} is not a readable params.npz ({reason}); rerun the training "
                     "to write it again.") from None
  missing = [k for k in (*Params._fields, *PREPROCESSING) if k not in arrays]
  if missing:
    raise ValueError(f"{file} lacks {', '.join(missing)}: it was written by an older "
                     "mlp_jax without the preprocessing; train the run again to use it.")
  arrays = {**{k: np.asarray(v, str) for k, v in LATER.items()}, **arrays}
  problem = _check_arrays(arrays)
  if problem:
    raise ValueError(f"{file} is not a valid params.npz: {problem}; rerun the training to "
                     "write it again.")
  params = Params(*(jnp.asarray(arrays[k]) for k in Params._fields))
  return TrainedModel(params, arrays["input_mean"], arrays["input_std"],
                      tuple(int(s) for s in arrays["input_shape"]),
                      tuple(str(c) for c in arrays["class_names"]), str(arrays["dataset"]),
                      float(arrays["pixel_max"]), str(arrays["activation"]),
                      tuple(str(n) for n in arrays["feature_names"]),
                      str(arrays["label_column"]))


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> Optional[str]:
  """What is wrong with the arrays of a params.npz (shapes that do not fit together,
  values that are not finite), or None."""
  w1, w2 = np.asarray(arrays["w1"]), np.asarray(arrays["w2"])
  std, shape = arrays["input_std"], arrays["input_shape"]
  if w1.ndim != 2 or w2.ndim != 2:
    return f"w1 {w1.shape} and w2 {w2.shape} must be matrices"
  (h, d), k = w1.shape, w2.shape[0]
  expected = {"b1": (h,), "w2": (k, h), "b2": (k,), "input_mean": (d,), "input_std": (d,),
              "class_names": (k,)}
  for name, want in expected.items():
    if np.shape(arrays[name]) != want:
      return (f"{name} is {np.shape(arrays[name])} where w1 {w1.shape} and w2 {w2.shape} "
              f"need {want}")
  if np.prod(shape, dtype=np.int64) != d:
    return f"input_shape {tuple(shape)} does not hold D = {d} values"
  for name in (*Params._fields, "input_mean", "input_std"):
    values = np.asarray(arrays[name])
    if not (np.issubdtype(values.dtype, np.floating) and np.all(np.isfinite(values))):
      return f"{name} holds values that are not finite numbers (NaN, inf, or {values.dtype})"
  if not np.all(std > 0):
    return "input_std holds values that are not > 0"
  names = arrays["feature_names"]
  if names.shape not in ((0,), (d,)):
    return f"feature_names is {names.shape} where w1 {w1.shape} needs ({d},) or none"
  activation = arrays["activation"]
  if activation.shape != () or str(activation) not in options.ACTIVATIONS:
    return (f"activation {str(activation)[:40]!r} is not one of "
            f"{', '.join(options.ACTIVATIONS)}")
  return None


def _file_ids(paths: Sequence[str]) -> dict[tuple[int, int], str]:
  """{(device, inode): path} of every file at `paths`, and under those that are
  directories (a workdir, a directory of PNGs)."""
  ids = {}
  for top in paths:
    for root, _, names in os.walk(top) if os.path.isdir(top) else [("", [], [top])]:
      for name in names:
        with contextlib.suppress(OSError):
          info = os.stat(os.path.join(root, name))
          ids[(info.st_dev, info.st_ino)] = os.path.join(root, name)
  return ids


@contextlib.contextmanager
def prediction_csv(path: str, model: TrainedModel, reads: Sequence[str] = ()
                   ) -> Iterator[Callable[[list[str], np.ndarray], None]]:
  """write(names, probabilities (n, K)): appends a batch's rows to the CSV at `path`
  (name, class, class_name, p_0 ...), written atomically when the block ends
  (files.atomic_file: never through a link, an earlier file kept if it fails). ValueError
  where `path` is a file of `reads` (the model's workdir and every file in it, the
  inputs), compared by device and inode: another name of one is the same file."""
  with contextlib.suppress(OSError):
    info = os.stat(path)
    read = _file_ids(reads).get((info.st_dev, info.st_ino))
    if read:
      raise ValueError(f"the output {escaped(path)} is {escaped(read)}, a file predict "
                       "reads (the model, its workdir or an input); it never writes over "
                       "what it reads: give a new file name for the predictions.")
  with files.atomic_file(path, "w") as f:
    out = csv.writer(f)
    out.writerow(["name", "class", "class_name", *(f"p_{c}" for c in model.class_names)])

    def write(names: list[str], probabilities: np.ndarray) -> None:
      for name, k, p in zip(names, np.asarray(prediction.classes(probabilities)),
                            probabilities):
        out.writerow([name, k, model.class_names[k], *(f"{v:.6g}" for v in p)])
    yield write


# Examples predict.py holds in memory at once: its memory does not grow with the input.
PREDICT_ROWS = 4096

Batch = tuple[list[str], np.ndarray, Optional[np.ndarray]]   # names, raw x, labels or None


def _checked(x: np.ndarray, labels: Optional[np.ndarray], path: str, model: TrainedModel
             ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """A batch of raw inputs (N, ...) and its labels, checked: real numbers (whether they
  are finite in the params' dtype is prediction's rule, after the cast), and labels
  (N,) integers of the model's classes; ValueError, one line."""
  real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
  if not (real and x.ndim >= 1):
    raise ValueError(f"{path}: the inputs must be an array (N, ...) of real numbers, got "
                     f"{x.dtype} of shape {x.shape}.")
  if labels is not None:
    labels = readers.labels(labels, len(x), "the labels", len(model.class_names))
  return x, labels


def iter_inputs(path: str, model: TrainedModel, labels_path: Optional[str] = None,
                rows: int = PREDICT_ROWS) -> Iterator[Batch]:
  """(names, raw inputs (n, ...), labels (n,) or None) of what `path` holds, in batches
  of at most `rows` examples (memory does not grow with the input):

      FILE.npz            x (or x_test) and optional y (or y_test)
      FILE.csv            a table with a header: the model's feature columns by name
                          (every column, for a model not trained on a table), and its
                          label column if there (labels, its class names)
      an IDX file         images or vectors (…-idx3-ubyte[.gz])
      PNG files           one path, a comma-separated list, or a directory of *.png

  and the labels of `labels_path` (given_labels), one per input in the same order, for
  inputs that do not hold their own. Raises ValueError (one line) for anything it cannot
  use, before or while it yields (labels more than the inputs: after the last batch).
  """
  paths = readers.input_paths(path)
  png = all(p.lower().endswith(".png") for p in paths)
  if len(paths) > 1 and not png:
    raise ValueError(f"{path}: give one .npz, CSV or IDX file, or PNG files.")
  given = given_labels(labels_path, model) if labels_path else None
  batches = (_png_rows(paths, model, rows) if png
             else readers.npz_rows(paths[0], rows) if paths[0].endswith(".npz")
             else _csv_rows(paths[0], model, rows) if paths[0].lower().endswith(".csv")
             else readers.idx_rows(paths[0], rows))
  done = 0
  for x, labels in batches:
    if given is not None:
      labels = _given_slice(given, labels, done, len(x), f"--input={path}")
    x, labels = _checked(x, labels, path, model)
    names = ([os.path.basename(p) for p in paths[done:done + len(x)]] if png
             else [str(i) for i in range(done, done + len(x))])
    yield names, x, labels
    done += len(x)
  if given is not None and done != len(given):
    raise ValueError(readers.labels_do_not_fit(done, given.shape))


def _png_rows(paths: list[str], model: TrainedModel, rows: int
              ) -> Iterator[tuple[np.ndarray, None]]:
  """(images (n, *input_shape), None) of PNG files, `rows` at a time."""
  for start in range(0, len(paths), rows):
    yield np.stack([readers.read_png(p, model.input_shape, model.pixel_max, model.dataset)
                    for p in paths[start:start + rows]]), None


def _given_slice(given: np.ndarray, own: Optional[np.ndarray], done: int, count: int,
                 inputs: str) -> np.ndarray:
  """The --labels of inputs done .. done + count; ValueError where the inputs hold
  their own labels or there are fewer labels than inputs."""
  if own is not None:
    raise ValueError(f"{inputs} holds its own labels; drop --labels (or give the inputs "
                     "without them).")
  if len(given) < done + count:
    raise ValueError(f"there are {len(given):,} labels for more than {len(given):,} "
                     "inputs: give one label per input (the labels file of the same split).")
  return given[done:done + count]


def given_labels(path: str, model: TrainedModel) -> np.ndarray:
  """The classes (N,) int64 of a labels file, checked against the model's K classes:

      FILE.npy            the labels
      FILE.npz            y (or y_test, or its only array)
      FILE.csv            the model's label column, or the file's only column
      an IDX file         labels (…-idx1-ubyte[.gz])

  Numbers are class indices; a CSV's cells are class names where every one is (_classes).
  ValueError, one line.
  """
  lower = path.lower()
  if lower.endswith(".npy"):
    values = files.read_npy(path, budget.memory_budget())
  elif lower.endswith(".npz"):
    with files.NpzArchive(path, budget.memory_budget()) as npz:
      key = next((k for k in ("y", "y_test") if k in npz.names),
                 npz.names[0] if len(npz.names) == 1 else None)
      if key is None:
        raise ValueError(f"{path} holds {', '.join(npz.names) or 'no arrays'}; name the "
                         "labels y.")
      values = npz.read(key)
  elif lower.endswith(".csv"):
    values = _classes(tables.csv_column(path, model.label_column or "label"), model, path)
  else:
    values = readers.read_idx(path)
  return readers.labels(values, len(values) if values.ndim else 1, f"the labels of {path}",
                        len(model.class_names))


def _classes(cells: np.ndarray, model: TrainedModel, path: str) -> np.ndarray:
  """A CSV's label cells (n,) str as class indices (n,): by the model's class names
  (tables.class_names' spelling) where every cell is one of them or the model was
  trained on a table; else as numbers (the indices of readers.labels)."""
  classes = {name: k for k, name in enumerate(model.class_names)}
  names = tables.class_names(cells)
  unknown = [name for name in names if name not in classes]
  if not unknown:
    return np.array([classes[name] for name in names], np.int64)
  if not model.label_column:
    with contextlib.suppress(ValueError):
      return cells.astype(np.float64)
  raise ValueError(f"{path}: the label {unknown[0][:40]!r} is not one of the model's "
                   f"classes ({', '.join(model.class_names)[:200]}).")


def _csv_rows(path: str, model: TrainedModel, rows: int
              ) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
  """(features, class indices or None) of a CSV table, in batches (tables.csv_rows)."""
  try:
    for x, labels in tables.csv_rows(path, model.label_column, rows,
                                      model.feature_names or None):
      yield x, None if labels is None else _classes(labels, model, path)
  except readers.DataError as e:
    raise ValueError(str(e)) from None


def read_inputs(path: str, model: TrainedModel, labels_path: Optional[str] = None
                ) -> tuple[list[str], np.ndarray, Optional[np.ndarray]]:
  """(names, raw inputs (N, ...), labels (N,) or None): iter_inputs' batches joined."""
  batches = list(iter_inputs(path, model, labels_path))
  names = [name for batch in batches for name in batch[0]]
  x = np.concatenate([batch[1] for batch in batches])
  labels = (None if batches[0][2] is None
            else np.concatenate([batch[2] for batch in batches]))  # type: ignore[misc]
  return names, x, labels
