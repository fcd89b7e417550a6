"""Cross-entropy and accuracy over a batch, as weighted means of per-example values.

    L = -sum_k y_k log p_k = (sum_k y_k) logsumexp(z2) - y . z2

computed in that stable form (never log(softmax)); for one-hot y it is
logsumexp(z2) - z2[label].
"""

import functools
from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from mlp_jax.core import checks, model
from mlp_jax.core.network import Network


def valid_labels(y: Array, num_classes: int) -> Array:
  """True (B,) where label y_i is a whole number in [0, K) (ints, or floats 0.0, 1.0...)."""
  valid = (y >= 0) & (y < num_classes)
  if jnp.issubdtype(y.dtype, jnp.floating):
    valid &= y == jnp.floor(y)
  return valid


def targets(y: Array, num_classes: int, dtype: DTypeLike) -> Array:
  """Labels (B,) -> one-hot targets Y (B, K); float targets (B, K) pass through.

  A label outside [0, K) or not a whole number gets a row of NaN. Outside jit
  `checks.check_labels` refuses it; under jit its value cannot be read, so the loss
  and every gradient become NaN instead of a plausible number (jax.nn.one_hot alone
  gives a zero row: a zero loss and a zero gradient).
  """
  if y.ndim != 1:
    return y.astype(dtype)
  valid = valid_labels(y, num_classes)
  one_hot = jax.nn.one_hot(jnp.where(valid, y, 0).astype(jnp.int32), num_classes,
                           dtype=dtype)
  return jnp.where(valid[:, None], one_hot, jnp.nan)


def mean_weights(weights: Optional[ArrayLike], batch_size: int, dtype: DTypeLike) -> Array:
  """The weights of the batch mean, (B,): 1/B each, or w / sum(w) (NaN if sum(w) = 0:
  the mean of no example is undefined; concrete weights are refused by checks)."""
  if weights is None:
    return jnp.full((batch_size,), 1.0 / batch_size, dtype)
  w = jnp.asarray(weights, dtype)
  return w / jnp.sum(w)


def cross_entropy(z2: Array, Y: Array) -> Array:
  """Per-example cross-entropy (B,) of logits Z2 (B, K) against targets Y (B, K)."""
  return jnp.sum(Y, axis=-1) * jax.nn.logsumexp(z2, axis=-1) - jnp.sum(Y * z2, axis=-1)


def loss(params: model.Params, X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike] = None,
         *, activation: str = "relu", compute_dtype: Optional[DTypeLike] = None) -> Array:
  """Mean cross-entropy of the batch: sum_i w_i L_i / sum_i w_i (w_i = 1 by default).

  X (B, D); y int labels (B,) in [0, K) or targets (B, K) such as one-hot or smoothed
  labels; weights (B,) optional, e.g. 0 for padding rows; activation f of the hidden
  layer (network.ACTIVATIONS); compute_dtype (bfloat16) for the matmuls, softmax and
  loss stay in the params' dtype. Returns a scalar.
  """
  return loss_and_logits(params, X, y, weights, activation=activation,
                         compute_dtype=compute_dtype)[0]


def loss_and_logits(params: model.Params, X: ArrayLike, y: ArrayLike,
                    weights: Optional[ArrayLike] = None, *, activation: str = "relu",
                    compute_dtype: Optional[DTypeLike] = None) -> tuple[Array, Array]:
  """(`loss`, logits Z2 (B, K)): the loss and the forward pass it came from."""
  net = Network(activation, compute_dtype)
  checks.check_all(params, X, y, weights)
  return _loss_and_logits(net, params, *as_arrays(X, y, weights))


@functools.partial(jax.jit, static_argnums=(0,))
def _loss_and_logits(net: Network, params: model.Params, X: Array, y: Array,
                     weights: Optional[Array]) -> tuple[Array, Array]:
  """loss_and_logits of checked arrays, one program (outside jit too, not op by op)."""
  dtype = params.w1.dtype
  z2 = model.batch_logits(net, params, X.astype(dtype))
  Y = targets(y, z2.shape[-1], dtype)
  return jnp.sum(mean_weights(weights, z2.shape[0], dtype) * cross_entropy(z2, Y)), z2


def as_arrays(X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike]
              ) -> tuple[Array, Array, Optional[Array]]:
  """X, y and the weights (or None) as JAX arrays, for a compiled function."""
  return jnp.asarray(X), jnp.asarray(y), None if weights is None else jnp.asarray(weights)


def accuracy(params: model.Params, X: ArrayLike, y: ArrayLike,
             weights: Optional[ArrayLike] = None, *, activation: str = "relu") -> Array:
  """Weighted fraction of rows whose argmax logit is the label (argmax of targets).

  NaN if a label is out of range or not a whole number (seen only under jit; outside
  it such labels raise), like `loss`.
  """
  net = Network(activation)
  checks.check_all(params, X, y, weights)
  return _accuracy(net, params, *as_arrays(X, y, weights))


@functools.partial(jax.jit, static_argnums=(0,))
def _accuracy(net: Network, params: model.Params, X: Array, y: Array,
              weights: Optional[Array]) -> Array:
  """accuracy of checked arrays, one program (outside jit too, not op by op)."""
  dtype = params.w1.dtype
  predicted = jnp.argmax(model.batch_logits(net, params, X.astype(dtype)), axis=-1)
  if y.ndim == 1:
    correct = jnp.where(valid_labels(y, params.w2.shape[0]),
                        (predicted == y).astype(dtype), jnp.nan)
  else:
    correct = (predicted == jnp.argmax(y, axis=-1)).astype(dtype)
  return jnp.sum(mean_weights(weights, predicted.shape[0], dtype) * correct)
