"""The network, in the source derivation's notation:

    z1 = W1 x + b1      a1 = f(z1)      z2 = W2 a1 + b2      p = softmax(z2)

Shapes: x (D,), W1 (H, D), b1 (H,), W2 (K, H), b2 (K,); f the network's activation
(network.ACTIVATIONS; ReLU by default). `forward` takes one example and `logits` a batch,
by jax.vmap of it; `forward_pass` (one example) and `activations` (a batch, an example
per row) are the one place the layers are written, for a `network.Network`.
"""

import functools
from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from mlp_jax.core import checks
from mlp_jax.core.network import Network
from mlp_jax.core.params import Params  # pylint: disable=unused-import  (model.Params)


def init_params(key: Array, in_dim: int, hidden_dim: int, num_classes: int, *,
                dtype: DTypeLike = jnp.float32) -> "Params":
  """He-normal W1 (H, D), LeCun-normal W2 (K, H), zero biases.

  W1 ~ N(0, 2/D) suits the ReLU that follows it; W2 ~ N(0, 1/H) keeps the logits z2
  of unit scale.
  """
  checks.check_key(key)
  for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim),
                      ("num_classes", num_classes)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"init_params: {name} must be a positive int, got {value!r}.")
  if num_classes < 2:
    raise ValueError(f"init_params: num_classes must be >= 2, got {num_classes}.")
  return _init_params(key, in_dim, hidden_dim, num_classes, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_params(key: Array, in_dim: int, hidden_dim: int, num_classes: int,
                 dtype: DTypeLike) -> "Params":
  """init_params of checked arguments, one program (outside jit too, not op by op)."""
  k1, k2 = jax.random.split(key)
  # The barrier keeps XLA from folding the scale into the sampler's own constants: the
  # same bits eager, jitted and vmapped.
  w1, w2 = jax.lax.optimization_barrier((
      jax.random.normal(k1, (hidden_dim, in_dim), dtype),
      jax.random.normal(k2, (num_classes, hidden_dim), dtype)))
  w1 = w1 * jnp.sqrt(2.0 / in_dim).astype(dtype)
  w2 = w2 * jnp.sqrt(1.0 / hidden_dim).astype(dtype)
  return Params(w1=w1, b1=jnp.zeros((hidden_dim,), dtype),
                w2=w2, b2=jnp.zeros((num_classes,), dtype))


def matmul(a: Array, b: Array, compute_dtype: Optional[DTypeLike] = None) -> Array:
  """a @ b. With a compute_dtype (bfloat16) other than a's, both operands are rounded to
  it and the products accumulate in float32 (or a's dtype, if wider), the result's dtype."""
  if compute_dtype is None or jnp.dtype(compute_dtype) == a.dtype:
    return a @ b
  return jnp.matmul(a.astype(compute_dtype), b.astype(compute_dtype),
                    preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def linear(X: Array, W: Array, compute_dtype: Optional[DTypeLike] = None) -> Array:
  """X Wᵀ (B, out): each row x of X (B, in) times W (out, in), the seed's W x row by
  row; compute_dtype as in `matmul`. Written as jnp.inner (one product over the last
  axis of both, no transpose): XLA's fast CPU bfloat16 GEMM takes that form, and
  X @ W.T ran 3.6 times slower in bfloat16 (B = 1024, D = 784, H = 1024)."""
  if compute_dtype is None or jnp.dtype(compute_dtype) == X.dtype:
    return jnp.inner(X, W)
  return jnp.inner(X.astype(compute_dtype), W.astype(compute_dtype),
                   preferred_element_type=jnp.promote_types(X.dtype, jnp.float32))


def activations(net: Network, params: "Params", X: Array) -> tuple[Array, Array, Array]:
  """(Z1, A1, Z2): every activation backprop needs, of a batch X (B, D), one example
  per row:

      Z1 = X W1ᵀ + b1  (B, H)      A1 = f(Z1)  (B, H)      Z2 = A1 W2ᵀ + b2  (B, K)

  row by row the seed's z1 = W1 x + b1, a1 = f(z1), z2 = W2 a1 + b2 (`linear`).
  net.compute_dtype (e.g. bfloat16) is the dtype X W1ᵀ reads, the H × D product that
  holds nearly all the FLOPs; the output layer (K × H, K ≪ H), the biases, Z1, A1 and Z2
  stay in the params' dtype (mixed precision that keeps the logits exact to float32).
  """
  Z1 = linear(X, params.w1, net.compute_dtype) + params.b1[None, :]
  A1 = net.f(Z1)
  Z2 = linear(A1, params.w2) + params.b2[None, :]
  return Z1, A1, Z2


def forward_pass(net: Network, params: "Params", x: Array) -> tuple[Array, Array, Array]:
  """One example x (D,) -> (z1 (H,), a1 (H,), z2 (K,)), the seed's lines as written:

      z1 = W1 x + b1      a1 = f(z1)      z2 = W2 a1 + b2

  `forward` and (by jax.vmap) `logits` and `loss`, what jax.grad differentiates, run
  these; `activations` is the same with an example per row, for the manual pass."""
  z1 = matmul(params.w1, x, net.compute_dtype) + params.b1
  a1 = net.f(z1)
  z2 = params.w2 @ a1 + params.b2
  return z1, a1, z2


def forward(params: "Params", x: ArrayLike, *, activation: str = "relu",
            compute_dtype: Optional[DTypeLike] = None) -> Array:
  """One example x (D,) -> logits z2 = W2 f(W1 x + b1) + b2, shape (K,)."""
  net = Network(activation, compute_dtype)
  checks.check_params(params)
  checks.check_example(params, x)
  return _forward(net, params, jnp.asarray(x))


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(net: Network, params: "Params", x: Array) -> Array:
  """forward of a checked example x (D,) -> z2 (K,), one compiled program."""
  return forward_pass(net, params, x)[2]


def logits(params: "Params", X: ArrayLike, *, activation: str = "relu",
           compute_dtype: Optional[DTypeLike] = None) -> Array:
  """A batch X (B, D) -> logits Z2 (B, K): jax.vmap of `forward` over the rows of X."""
  net = Network(activation, compute_dtype)
  checks.check_params(params)
  checks.check_batch(params, X)
  return batch_logits(net, params, jnp.asarray(X))


@functools.partial(jax.jit, static_argnums=(0,))
def batch_logits(net: Network, params: "Params", X: Array) -> Array:
  """logits of a checked batch X (B, D) -> Z2 (B, K), one compiled program."""
  return jax.vmap(forward_pass, in_axes=(None, None, 0))(net, params, X)[2]
