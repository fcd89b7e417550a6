"""A finished run as a model for new data: its params and the preprocessing that maps a
raw example to the network's input, saved together in WORKDIR/params.npz.

    model = mj.load("WORKDIR")       # or mj.load("WORKDIR/params.npz")
    model.predict_proba(x_raw)       # raw inputs (N, *input_shape) or (N, D) -> p (N, K)
    model.predict(x_raw)             # -> classes (N,), int32

    x = (x_raw.reshape(N, D) − mean) / std,  p = softmax(W2 ReLU(W1 x + b1) + b2)

params.npz loads with numpy alone: w1, b1, w2, b2 and input_mean, input_std (D,),
input_shape, class_names, dataset, pixel_max (the raw value of a white pixel; 0 when
the inputs are not images).
"""

import glob
import os
import warnings
import zipfile
from typing import IO, Any, Mapping, NamedTuple, Optional, Union

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from mlp_jax import data
from mlp_jax import model as mlp
from mlp_jax.model import Params

PREPROCESSING = ("input_mean", "input_std", "input_shape", "class_names", "dataset",
                 "pixel_max")


class TrainedModel(NamedTuple):
  """Params (W1 (H, D), b1, W2 (K, H), b2) with the preprocessing of their run."""

  params: Params
  mean: np.ndarray       # (D,) float32
  std: np.ndarray        # (D,) float32
  input_shape: tuple[int, ...]   # one raw example, e.g. (28, 28) or (D,)
  class_names: tuple[str, ...]   # K names
  dataset: str
  pixel_max: float       # raw value of a white pixel; 0: not an image dataset

  def inputs(self, x_raw: ArrayLike) -> Array:
    """Raw examples (N, *input_shape) or (N, D) -> the network's inputs (N, D) float32."""
    x_raw = jnp.asarray(x_raw)
    d = self.mean.shape[0]
    if x_raw.ndim < 1 or x_raw.shape[1:] not in (tuple(self.input_shape), (d,)):
      raise ValueError(f"inputs of shape {x_raw.shape} do not fit this model: give "
                       f"(N, {', '.join(map(str, self.input_shape))}) or (N, {d}), raw "
                       f"values as in the {self.dataset} training data.")
    x = x_raw.reshape(x_raw.shape[0], d).astype(jnp.float32)
    return (x - self.mean[None, :]) / self.std[None, :]

  def predict_proba(self, x_raw: ArrayLike) -> Array:
    """p = softmax(z2) (N, K) of raw examples (N, *input_shape) or (N, D); jit-able."""
    return jax.nn.softmax(mlp.logits(self.params, self.inputs(x_raw)), axis=-1)

  def predict(self, x_raw: ArrayLike) -> Array:
    """The most probable class (N,) int32 of raw examples; jit-able. A row whose logits
    are not finite (NaN or inf in its input) gets -1, never a plausible class."""
    z2 = mlp.logits(self.params, self.inputs(x_raw))
    classes = jnp.argmax(z2, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.all(jnp.isfinite(z2), axis=-1), classes, -1)


def save(path: Union[str, IO[bytes]], params: Params, inputs: data.Dataset, dataset: str
         ) -> None:
  """Writes params.npz (`path`: a path or a binary file): the params (W1 (H, D), ...)
  and the preprocessing of TrainedModel, from `inputs`, the run's data.Dataset (its
  mean, std (D,), input_shape and class_names; its arrays are not needed)."""
  arrays: dict[str, Any] = {k: np.asarray(v) for k, v in params._asdict().items()}
  np.savez(path, **arrays, input_mean=np.asarray(inputs.mean, np.float32),
           input_std=np.asarray(inputs.std, np.float32),
           input_shape=np.asarray(inputs.input_shape, np.int64),
           class_names=np.asarray(inputs.class_names, str), dataset=np.asarray(dataset, str),
           pixel_max=np.float64(data.PIXEL_MAX.get(dataset, 0.0)))


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
    with open(file, "rb") as handle, np.load(handle, allow_pickle=False) as f:
      arrays = dict(f)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{file} is not a readable params.npz (truncated, or not an .npz: "
                     f"{str(e).splitlines()[0][:80] if str(e) else type(e).__name__}); "
                     "rerun the training to write it again.") from None
  missing = [k for k in (*Params._fields, *PREPROCESSING) if k not in arrays]
  if missing:
    raise ValueError(f"{file} lacks {', '.join(missing)}: it was written by an older "
                     "mlp_jax without the preprocessing; train the run again to use it.")
  problem = _check_arrays(arrays)
  if problem:
    raise ValueError(f"{file} is not a valid params.npz: {problem}; rerun the training to "
                     "write it again.")
  params = Params(*(jnp.asarray(arrays[k]) for k in Params._fields))
  return TrainedModel(params, arrays["input_mean"], arrays["input_std"],
                      tuple(int(s) for s in arrays["input_shape"]),
                      tuple(str(c) for c in arrays["class_names"]), str(arrays["dataset"]),
                      float(arrays["pixel_max"]))


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
  return None


def read_png(path: str, model: TrainedModel) -> np.ndarray:
  """One 8-bit grayscale PNG of the model's image size -> raw values (h, w) float32,
  0..255 mapped to 0..pixel_max; anything else raises ValueError naming the fix."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not model.pixel_max or len(model.input_shape) != 2:
    raise ValueError(f"{path}: this model was trained on {model.dataset}, not on images; "
                     "give an .npz of raw inputs.")
  h, w = model.input_shape
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as image:  # reads the header only
        mode, size = image.mode, image.size
        if mode != "L" or size != (w, h):  # checked before any pixel is decoded
          raise ValueError(f"{path}: a {size[0]}×{size[1]} image of mode {mode}; this "
                           f"model takes 8-bit grayscale (mode L) images of {w}×{h} "
                           "pixels: convert it first.")
        pixels = np.asarray(image)
  except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ValueError(f"{path}: not a readable image of {w}×{h} pixels "
                     f"({str(e).splitlines()[0][:100]}).") from None
  return pixels.astype(np.float32) * np.float32(model.pixel_max / 255)


def _read_npz_inputs(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(x, y or None) of an .npz of x (or x_test) and y (or y_test); ValueError, one line."""
  try:
    with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
      key = next((k for k in ("x", "x_test") if k in f), None)
      if key is None:
        raise ValueError(f"{path} holds {', '.join(f.files)}; name the inputs x "
                         "(and the labels y).")
      label_key = {"x": "y", "x_test": "y_test"}[key]
      return f[key], (f[label_key] if label_key in f else None)
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}).") from None


def read_inputs(path: str, model: TrainedModel, labels_path: Optional[str] = None
                ) -> tuple[list[str], np.ndarray, Optional[np.ndarray]]:
  """(names, raw inputs (N, ...), labels (N,) or None) of what `path` holds:

      FILE.npz            x (or x_test) and optional y (or y_test)
      an IDX file         images or vectors (…-idx3-ubyte[.gz]); labels from labels_path
      PNG files           one path, a comma-separated list, or a directory of *.png

  Raises ValueError (one line) for anything it cannot use.
  """
  paths = [p for p in path.split(",") if p]
  if len(paths) == 1 and os.path.isdir(paths[0]):
    paths = sorted(glob.glob(os.path.join(paths[0], "*.png")))
    if not paths:
      raise ValueError(f"{path} holds no .png files.")
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing or not paths:
    raise ValueError(f"no such file: {', '.join(missing) or path!r}.")
  labels: Any = None
  names: Optional[list[str]]
  x: Any
  if all(p.lower().endswith(".png") for p in paths):

    x = np.stack([read_png(p, model) for p in paths])
    names = [os.path.basename(p) for p in paths]
  elif len(paths) == 1 and paths[0].endswith(".npz"):
    x, labels = _read_npz_inputs(paths[0])
    names = None  # numbered below, once x is known to be an array of examples
  elif len(paths) == 1:
    try:
      x = data.read_idx(paths[0])
    except data.DataError as e:
      raise ValueError(f"{e} Inputs are read from .npz, IDX or .png files.") from None
    names = None
  else:
    raise ValueError(f"{path}: give one .npz or IDX file, or PNG files.")
  if labels_path:
    labels = data.read_idx(labels_path)
  x = np.asarray(x)
  real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
  if not (real and x.ndim >= 1 and np.all(np.isfinite(x))):
    raise ValueError(f"{path}: the inputs must be an array (N, ...) of finite real "
                     f"numbers, got {x.dtype} of shape {x.shape}.")
  names = names or [str(i) for i in range(len(x))]
  if labels is not None:
    labels = np.asarray(labels)
    k = len(model.class_names)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"the labels must be (N,) = ({len(x)},) integers, got "
                       f"{labels.dtype} {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
      raise ValueError(f"the labels run from {labels.min()} to {labels.max()}, but this "
                       f"model has classes 0 to {k - 1}: give labels of the same classes.")
  return names, x, labels
