"""Input checks that turn a bad shape or label into a clear error at trace time.

Every public function calls these before any math, so a wrong shape names the
argument and the expected shape instead of failing deep inside a jnp.dot.
Label VALUES can only be read when they are concrete: `check_labels` checks them
outside jit; under jit a bad label turns the loss and gradients into NaN
(losses.targets), so it is never a plausible number.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _shape(a: Any) -> tuple[int, ...]:
  return tuple(np.shape(a))


def _dtype(a: Any) -> np.dtype:
  """The dtype of `a` as given: numpy float64 stays float64 even with x64 off."""
  return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def check_key(key: Any) -> None:
  """Checks `key` is a JAX PRNG key (jax.random.key(s) or jax.random.PRNGKey(s))."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return
  if _shape(key) == (2,) and _dtype(key) == np.uint32:
    return
  raise TypeError(f"key must be a JAX PRNG key, got {type(key).__name__} {key!r:.40}; "
                  "pass jax.random.key(seed), e.g. mj.init_params(jax.random.key(0), ...).")


def check_params(params: Any) -> tuple[int, int, int]:
  """Checks w1 (H, D), b1 (H,), w2 (K, H), b2 (K,) agree; returns (D, H, K)."""
  if isinstance(params, tuple) and len(params) == 4 and not hasattr(params, "w1"):
    raise TypeError("params must be mlp_jax.Params(w1, b1, w2, b2), got a plain "
                    f"{type(params).__name__}; wrap it: mj.Params(*params).")
  if not (isinstance(params, tuple) and len(params) == 4):
    raise TypeError(
        "params must be mlp_jax.Params(w1, b1, w2, b2) (see mj.init_params), got "
        f"{type(params).__name__}.")
  w1, b1, w2, b2 = params
  if len(_shape(w1)) != 2 or len(_shape(w2)) != 2:
    raise ValueError(f"params.w1 must be (H, D) and params.w2 (K, H); got w1 "
                     f"{_shape(w1)} and w2 {_shape(w2)}.")
  (h, d), (k, h2) = _shape(w1), _shape(w2)
  if h2 != h:
    raise ValueError(f"params.w2 must be (K, H) with H = {h} (the rows of w1 (H, D)); "
                     f"got w2 {_shape(w2)}.")
  if _shape(b1) != (h,) or _shape(b2) != (k,):
    raise ValueError(f"params.b1 must be ({h},) and params.b2 ({k},) to match w1 "
                     f"{(h, d)} and w2 {(k, h)}; got b1 {_shape(b1)}, b2 {_shape(b2)}.")
  for name, leaf in zip(("w1", "b1", "w2", "b2"), params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"params.{name} must be floating point, got {jnp.result_type(leaf)}; "
                      "create params with mj.init_params.")
  return d, h, k


def check_example(params: Any, x: Any) -> None:
  """Checks one example x is (D,) for w1 (H, D)."""
  d = _shape(params[0])[1]
  if _shape(x) != (d,):
    raise ValueError(f"forward takes ONE example x of shape ({d},) for w1 "
                     f"{_shape(params[0])}; got {_shape(x)}. For a batch (B, {d}) use "
                     "mj.logits.")


def _check_array(a: Any, name: str) -> None:
  """TypeError unless `a` is an array (numpy or JAX): a list has no dtype to check."""
  if not (hasattr(a, "shape") and hasattr(a, "dtype")):
    raise TypeError(f"{name} must be an array, got {type(a).__name__}; pass "
                    f"jnp.asarray({name}).")


def check_batch(params: Any, X: Any) -> int:
  """Checks X is a batch (B, D) for w1 (H, D); returns B."""
  _check_array(X, "X")
  d = _shape(params[0])[1]
  if len(_shape(X)) != 2 or _shape(X)[1] != d:
    raise ValueError(f"X must be a batch of shape (B, {d}) for w1 {_shape(params[0])}; "
                     f"got {_shape(X)}. Flatten images to (B, D); for one example use "
                     "X[None].")
  if not jnp.issubdtype(_dtype(X), jnp.floating):
    raise TypeError(f"X must be floating point, got {_dtype(X)}; "
                    "convert it with X.astype(jnp.float32).")
  if _shape(X)[0] == 0:
    raise ValueError(f"X {_shape(X)} has no rows; a batch needs at least one example.")
  return _shape(X)[0]


def check_labels(y: Any, batch_size: int, num_classes: int) -> None:
  """Checks y is labels (B,) in [0, K) (ints, or floats holding whole numbers) or float
  targets (B, K). Label values are checked when concrete (not under jit)."""
  _check_array(y, "y")
  shape = _shape(y)
  dtype = _dtype(y)
  if shape == (batch_size,):
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
      raise TypeError(f"labels y of shape ({batch_size},) must be class indices in [0, "
                      f"{num_classes}), got dtype {dtype}; cast with y.astype(jnp.int32), "
                      f"or pass targets of shape ({batch_size}, {num_classes}).")
    try:
      y = np.asarray(y)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return  # traced (jit, vmap): losses.targets makes a bad label's loss NaN
    if not np.all(np.isfinite(y)) or np.any(y != np.floor(y)):
      bad = y[~np.isfinite(y) | (y != np.floor(y))][0]
      raise ValueError(f"labels y must be whole numbers (class indices), got {bad:g}; "
                       f"pass int labels in [0, {num_classes}) or targets ({batch_size}, "
                       f"{num_classes}).")
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f"labels y must lie in [0, {num_classes}) for K = {num_classes} "
                       f"classes; got min {y.min():g}, max {y.max():g}.")
  elif shape == (batch_size, num_classes):
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"targets y of shape {shape} must be floating point, got {dtype}.")
  else:
    raise ValueError(f"y must be int labels ({batch_size},) or targets ({batch_size}, "
                     f"{num_classes}) for X with B = {batch_size} rows and K = "
                     f"{num_classes} classes; got shape {shape}.")


def check_weights(weights: Any, batch_size: int, name: str = "weights", mean: bool = True
                  ) -> None:
  """Checks optional per-example weights (or a mask: `name`) are (B,). For a weighted
  `mean`, concrete weights must not sum to 0: the mean of no example is undefined (under
  jit it is NaN, never 0)."""
  if weights is None:
    return
  if _shape(weights) != (batch_size,):
    raise ValueError(f"{name} must have shape ({batch_size},), one per row of X; "
                     f"got {_shape(weights)}.")
  try:
    total = float(np.sum(np.asarray(weights)))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if mean and not total > 0:
    raise ValueError(f"{name} sum to {total:g}: a weighted mean needs weights that sum "
                     "to more than 0 (at least one example with weight > 0).")


def check_all(params: Any, X: Any, y: Any, weights: Optional[Any] = None,
              weights_name: str = "weights", mean: bool = True
              ) -> tuple[int, int, int, int]:

  """Checks params, X (B, D), y and weights (or a mask) together; returns (B, D, H, K)."""
  d, h, k = check_params(params)
  b = check_batch(params, X)
  check_labels(y, b, k)
  check_weights(weights, b, weights_name, mean)
  return b, d, h, k
