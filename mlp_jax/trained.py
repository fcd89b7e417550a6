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
from typing import NamedTuple

import jax
import jax.numpy as jnp
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
  input_shape: tuple     # one raw example, e.g. (28, 28) or (D,)
  class_names: tuple     # K names
  dataset: str
  pixel_max: float       # raw value of a white pixel; 0: not an image dataset

  def inputs(self, x_raw):
    """Raw examples (N, *input_shape) or (N, D) -> the network's inputs (N, D) float32."""
    x_raw = jnp.asarray(x_raw)
    d = self.mean.shape[0]
    if x_raw.ndim < 1 or x_raw.shape[1:] not in (tuple(self.input_shape), (d,)):
      raise ValueError(f"inputs of shape {x_raw.shape} do not fit this model: give "
                       f"(N, {', '.join(map(str, self.input_shape))}) or (N, {d}), raw "
                       f"values as in the {self.dataset} training data.")
    x = x_raw.reshape(x_raw.shape[0], d).astype(jnp.float32)
    return (x - self.mean[None, :]) / self.std[None, :]

  def predict_proba(self, x_raw):
    """p = softmax(z2) (N, K) of raw examples (N, *input_shape) or (N, D); jit-able."""
    return jax.nn.softmax(mlp.logits(self.params, self.inputs(x_raw)), axis=-1)

  def predict(self, x_raw):
    """The most probable class (N,) int32 of raw examples; jit-able."""
    return jnp.argmax(mlp.logits(self.params, self.inputs(x_raw)), axis=-1).astype(jnp.int32)


def save(path, params, mean, std, input_shape, class_names, dataset, pixel_max=0.0):
  """Writes params.npz (`path`: a path or a binary file): the params and the
  preprocessing of TrainedModel."""
  np.savez(path, **{k: np.asarray(v) for k, v in params._asdict().items()},
           input_mean=np.asarray(mean, np.float32), input_std=np.asarray(std, np.float32),
           input_shape=np.asarray(input_shape, np.int64),
           class_names=np.asarray(class_names, str), dataset=np.asarray(dataset, str),
           pixel_max=np.float64(pixel_max))


def load(path):
  """The TrainedModel of a workdir (or of its params.npz); ValueError, one line, if it
  is not there or not a params.npz this version writes."""
  file = os.path.join(path, "params.npz") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(f"no params.npz at {file}: give the --workdir of a finished run.")
  try:
    with np.load(file, allow_pickle=False) as f:
      arrays = dict(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{file} is not a readable .npz ({e}).") from None
  missing = [k for k in (*Params._fields, *PREPROCESSING) if k not in arrays]
  if missing:
    raise ValueError(f"{file} lacks {', '.join(missing)}: it was written by an older "
                     "mlp_jax without the preprocessing; train the run again to use it.")
  params = Params(*(jnp.asarray(arrays[k]) for k in Params._fields))
  return TrainedModel(params, arrays["input_mean"], arrays["input_std"],
                      tuple(int(s) for s in arrays["input_shape"]),
                      tuple(str(c) for c in arrays["class_names"]), str(arrays["dataset"]),
                      float(arrays["pixel_max"]))


def read_png(path, model):
  """One 8-bit grayscale PNG of the model's image size -> raw values (h, w) float32,
  0..255 mapped to 0..pixel_max; anything else raises ValueError naming the fix."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not model.pixel_max or len(model.input_shape) != 2:
    raise ValueError(f"{path}: this model was trained on {model.dataset}, not on images; "
                     "give an .npz of raw inputs.")
  h, w = model.input_shape
  try:
    with Image.open(path) as image:
      mode, size = image.mode, image.size
      pixels = np.asarray(image)
  except OSError as e:
    raise ValueError(f"{path}: not a readable image ({e}).") from None
  if mode != "L" or size != (w, h):
    raise ValueError(f"{path}: a {size[0]}×{size[1]} image of mode {mode}; this model "
                     f"takes 8-bit grayscale (mode L) images of {w}×{h} pixels: convert "
                     "it first.")
  return pixels.astype(np.float32) * np.float32(model.pixel_max / 255)


def read_inputs(path, model, labels_path=None):
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
  labels = None
  if all(p.lower().endswith(".png") for p in paths):
    x = np.stack([read_png(p, model) for p in paths])
    names = [os.path.basename(p) for p in paths]
  elif len(paths) == 1 and paths[0].endswith(".npz"):
    with np.load(paths[0], allow_pickle=False) as f:
      key = next((k for k in ("x", "x_test") if k in f), None)
      if key is None:
        raise ValueError(f"{paths[0]} holds {', '.join(f.files)}; name the inputs x "
                         "(and the labels y).")
      x = f[key]
      label_key = {"x": "y", "x_test": "y_test"}[key]
      labels = f[label_key] if label_key in f else None
    names = [str(i) for i in range(len(x))]
  elif len(paths) == 1:
    try:
      x = data.read_idx(paths[0])
    except data.DataError as e:
      raise ValueError(f"{e} Inputs are read from .npz, IDX or .png files.") from None
    names = [str(i) for i in range(len(x))]
  else:
    raise ValueError(f"{path}: give one .npz or IDX file, or PNG files.")
  if labels_path:
    labels = data.read_idx(labels_path)
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.number) and np.all(np.isfinite(x))):
    raise ValueError(f"{path}: the inputs must be finite numbers (dtype {x.dtype}).")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"the labels must be (N,) = ({len(x)},) integers, got "
                       f"{labels.dtype} {labels.shape}.")
  return names, x, labels
