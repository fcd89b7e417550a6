"""One predict: raw inputs -> the network's inputs -> logits -> probabilities -> classes.

    x = (x_raw − μ) / σ   in the params' dtype (N, D)
    p = softmax(W2 f(W1 x + b1) + b2)   (N, K)        class = argmax_k p_k

mj.load(workdir).predict / predict_proba, experiments/predict.py and
MLPClassifier.predict / predict_proba all run these functions, so they share one rule
for an input that is not a finite number in the params' dtype (NaN, ±inf, or beyond
its range, as 1e300 is for float32): checked AFTER the cast, such a row is refused with
one ValueError naming it wherever the values can be read, and so is a row of finite
inputs whose logits overflow; under jax.jit, where they cannot, its probabilities are
NaN and its class is -1, never a plausible class (and never used as an index here:
every path that names a class reads concrete values, so refuses first).
"""

import functools
from typing import Optional, Sequence

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike
import numpy as np

from mlp_jax.core import model
from mlp_jax.core.model import Params
from mlp_jax.core.network import Network


def network_inputs(x: ArrayLike, mean: ArrayLike, std: ArrayLike,
                   dtype: DTypeLike = jnp.float32,
                   names: Optional[Sequence[str]] = None) -> ArrayLike:
  """(x − μ) / σ (N, D) in `dtype`, of rows x (N, D) cast to `dtype` first (NumPy where
  x is concrete, traced under jit); checked by `check_finite` when concrete (names: the
  rows' names for its message)."""
  if isinstance(x, jax.core.Tracer):
    x = x.astype(dtype)
  else:
    with np.errstate(over="ignore"):  # 1e300 -> inf: refused below
      x = np.asarray(x).astype(dtype)
  scaled = _standardized(x, jnp.asarray(mean), jnp.asarray(std))
  check_finite(scaled, names)
  return scaled


@jax.jit
def _standardized(x: ArrayLike, mean: Array, std: Array) -> Array:
  """(x − μ) / σ (N, D), one compiled program (not one per operation when eager)."""
  return (jnp.asarray(x) - mean[None, :]) / std[None, :]


def _first_bad_row(values: ArrayLike, names: Optional[Sequence[str]]
                   ) -> Optional[str]:
  """The name (or index) of the first row of `values` (N, ...) holding a value that is
  not finite, with how many more there are; None where all are, or under jit."""
  if isinstance(values, jax.core.Tracer):
    return None
  bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(values)), axis=1))
  if not bad.size:
    return None
  row = names[bad[0]] if names is not None else str(bad[0])
  return f"{row}" + (f" (and {bad.size - 1} more row(s))" if bad.size > 1 else "")


def check_finite(x: ArrayLike, names: Optional[Sequence[str]] = None) -> None:
  """ValueError, one line naming the first row of x (N, D) that holds a value that is
  not a finite number of x's dtype; nothing to check under jit (`probabilities` then
  flags the row)."""
  row = _first_bad_row(x, names)
  if row is not None:
    dtype = np.asarray(x).dtype
    limit = float(jnp.finfo(dtype).max)
    raise ValueError(f"input row {row} is not a finite {dtype} number once scaled ("
                     f"NaN, inf, or beyond ±{limit:.3g}, such as 1e300); give finite "
                     f"inputs within {dtype}'s range.")


def probabilities(params: Params, x: ArrayLike, activation: str = "relu",
                  names: Optional[Sequence[str]] = None) -> Array:
  """p = softmax(z2) (N, K) of the network's inputs x (N, D), f = `activation`. A row
  whose logits z2 are not finite (finite inputs can overflow W2 f(W1 x + b1) + b2) is
  refused with one ValueError naming it (names: the rows' names); under jit, where the
  values cannot be read, its probabilities are NaN (and its class -1)."""
  p = _probabilities(params, x, activation)
  row = _first_bad_row(p, names)
  if row is not None:
    raise ValueError(f"input row {row}: the network's logits z2 are not finite (the "
                     "inputs are, but W2 f(W1 x + b1) + b2 overflows "
                     f"{np.asarray(p).dtype}), so it has no class; give inputs in the "
                     "range the model was trained on.")
  return p


@functools.partial(jax.jit, static_argnames=("activation",))
def _probabilities(params: Params, x: ArrayLike, activation: str) -> Array:
  """probabilities' program: NaN rows where the logits are not finite."""
  z2 = model.batch_logits(Network(activation), params, jnp.asarray(x))
  finite = jnp.all(jnp.isfinite(z2), axis=1, keepdims=True)
  return jnp.where(finite, jax.nn.softmax(z2, axis=1), jnp.nan)


@jax.jit
def classes(p: ArrayLike) -> Array:
  """argmax_k p_k (N,) int32 of probabilities (N, K); -1 for a NaN row."""
  k = jnp.argmax(p, axis=1).astype(jnp.int32)
  return jnp.where(jnp.all(jnp.isfinite(p), axis=1), k, -1)
