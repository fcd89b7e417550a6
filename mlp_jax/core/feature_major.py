"""A kernel: the manual pass of gradients.backprop with each example as a COLUMN.

gradients.backprop is the reference (an example per row, the program jax.grad compiles
to). This is the same pass on the transposed activations, the one layout in which XLA's
fast CPU bfloat16 GEMM takes both H × D products:

    Z1ᵀ = W1 Xᵀ + b1 (H, B)      A1ᵀ = f(Z1ᵀ)      Z2ᵀ = W2 A1ᵀ + b2 (K, B)
    Δ2ᵀ = ŵ ⊙ (Pᵀ Σy − Yᵀ) (K, B)      Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ f′(Z1ᵀ) (H, B)
    dW1 = Δ1ᵀ X    db1 = Σ_cols Δ1ᵀ    dW2 = Δ2ᵀ A1    db2 = Σ_cols Δ2ᵀ

Each product is written as an einsum whose output needs no transpose. tests/
test_feature_major.py proves it equal to the reference (float32, float64, and bfloat16
against float32 arithmetic on the rounded operands, on every input class the reference
is tested on); network.choose_layout says where it is the faster program, and
gradients.manual_pass is the one place that asks.
"""

from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import DTypeLike

from mlp_jax.core import losses
from mlp_jax.core.model import Params
from mlp_jax.core.network import Network


def _einsum(spec: str, a: Array, b: Array, compute_dtype: Optional[DTypeLike] = None
            ) -> Array:
  """jnp.einsum(spec, a, b); with a compute_dtype other than a's (model.matmul's rule),
  both operands rounded to it and the products accumulated in float32 or wider."""
  if compute_dtype is None or jnp.dtype(compute_dtype) == a.dtype:
    return jnp.einsum(spec, a, b)
  return jnp.einsum(spec, a.astype(compute_dtype), b.astype(compute_dtype),
                    preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def backprop(net: Network, params: Params, X: Array, Y: Array, w: Array
             ) -> tuple[tuple[Array, Array], Params]:
  """gradients.backprop's ((loss, logits Z2 (B, K)), Params), computed with examples as
  columns (module docstring); X (B, D), Y (B, K) and ŵ (B,) as it takes them."""
  compute_dtype = net.compute_dtype
  Z1 = _einsum("hd,bd->hb", params.w1, X, compute_dtype) + params.b1[:, None]   # (H, B)
  A1 = net.f(Z1)
  Z2 = jnp.einsum("kh,hb->kb", params.w2, A1) + params.b2[:, None]             # (K, B)
  logits = Z2.T                                                                # (B, K)
  loss = jnp.sum(w * losses.cross_entropy(logits, Y))
  Yt = Y.T
  delta2 = w[None, :] * (jax.nn.softmax(Z2, axis=0) * jnp.sum(Yt, axis=0, keepdims=True)
                         - Yt)                                                 # (K, B)
  delta1 = jnp.einsum("kh,kb->hb", params.w2, delta2) * net.f_prime(Z1)
  grads = Params(w1=_einsum("hb,bd->hd", delta1, X, compute_dtype),
                 b1=jnp.sum(delta1, axis=1),
                 w2=jnp.einsum("kb,hb->kh", delta2, A1),
                 b2=jnp.sum(delta2, axis=1))
  return (loss, logits), grads
