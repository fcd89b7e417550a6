"""The gradients of mj.loss: hand-derived (manual) next to jax.grad (autodiff).

One example (docs/derivation.md derives each line; tests/test_gradients.py proves them
equal to jax.grad and to finite differences):

    δ2 = ∂L/∂z2 = p Σy − y               (= p − y for one-hot y)           (K,)
    ∂L/∂W2 = δ2 a1ᵀ      ∂L/∂b2 = δ2                                  (K, H), (K,)
    δ1 = ∂L/∂z1 = (W2ᵀ δ2) ⊙ 1[z1 ≥ 0]                                      (H,)
    ∂L/∂W1 = δ1 xᵀ       ∂L/∂b1 = δ1                                  (H, D), (H,)

A batch X (B, D) with mean weights ŵ (B,) (ŵ_i = 1/B unweighted):

    Δ2 = ŵ ⊙ (P Σy − Y) (B, K)    dW2 = Δ2ᵀ A1    db2 = Σ_rows Δ2
    Δ1 = (Δ2 W2) ⊙ 1[Z1 ≥ 0] (B, H)    dW1 = Δ1ᵀ X    db1 = Σ_rows Δ1

With a compute_dtype (bfloat16) the same formulas run FEATURE-MAJOR: every activation
and delta is kept as its transpose, Z1ᵀ (H, B), Z2ᵀ (K, B), Δ2ᵀ, Δ1ᵀ, and X as it is:

    Z1ᵀ = W1 Xᵀ + b1    Z2ᵀ = W2 A1ᵀ + b2    Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ 1[Z1ᵀ ≥ 0]    dW1 = Δ1ᵀ X

so both H × D products are plain row-major GEMMs. XLA's fast CPU bfloat16 GEMM takes
that layout only: written batch-major, dW1 = Δ1ᵀ X contracts the batch axis of two
row-major operands and falls back to float32 speed (docs/benchmarks.md measures both).
In float32 the batch-major form is the faster one and stays.
"""

import functools

from typing import Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from mlp_jax import checks
from mlp_jax import losses
from mlp_jax import model
from mlp_jax.model import Params
from mlp_jax.model import matmul


def output_delta(z2: Array, Y: Array, axis: int = -1) -> Array:
  """δ2 = ∂L/∂z2 = softmax(z2) Σy − y, for z2, Y of shape (K,) or (B, K), the classes
  along `axis` (0 for the feature-major Z2ᵀ, Yᵀ (K, B))."""
  return jax.nn.softmax(z2, axis=axis) * jnp.sum(Y, axis=axis, keepdims=True) - Y


def relu_derivative(z1: Array, dtype: DTypeLike) -> Array:
  """ReLU'(z1) = 1[z1 ≥ 0], written as 1 − 1[z1 < 0] to match model.relu: a NaN z1
  passes (as autodiff of model.relu passes it), so NaN stays NaN in δ1 too."""
  return (~(z1 < 0)).astype(dtype)


def feature_major(params: Params, compute_dtype: Optional[DTypeLike]) -> bool:
  """True where the matmuls read a narrower dtype than the params (bfloat16): the
  manual passes then keep activations and deltas transposed (module docstring)."""
  return compute_dtype is not None and jnp.dtype(compute_dtype) != params.w1.dtype


def per_example(v: Array, is_feature_major: bool) -> Array:
  """A per-example vector v (B,) shaped to scale the rows of a (B, ·) array, or the
  columns of its (·, B) transpose."""
  return v[None, :] if is_feature_major else v[:, None]


def hidden_delta(params: Params, delta2: Array, z1: Array, is_feature_major: bool = False
                 ) -> Array:
  """δ1 = ∂L/∂z1 = (W2ᵀ δ2) ⊙ 1[z1 ≥ 0], for δ2 (K,) or (B, K) and z1 (H,) or (B, H);
  feature-major, Δ1ᵀ (H, B) from Δ2ᵀ (K, B) and Z1ᵀ (H, B)."""
  back = params.w2.T @ delta2 if is_feature_major else delta2 @ params.w2
  return back * relu_derivative(z1, delta2.dtype)


def batch_activations(params: Params, X: Array, compute_dtype: Optional[DTypeLike] = None,
                      is_feature_major: bool = False) -> tuple[Array, Array, Array]:
  """Z1 (B, H), A1 (B, H), Z2 (B, K): model.forward_pass vmapped over the rows of X;
  feature-major, Z1ᵀ, A1ᵀ (H, B) and Z2ᵀ (K, B)."""
  if not is_feature_major:
    return jax.vmap(model.forward_pass, in_axes=(None, 0, None))(params, X, compute_dtype)
  Z1 = model.matmul_transposed(params.w1, X, compute_dtype) + params.b1[:, None]  # W1 Xᵀ
  A1 = model.relu(Z1)
  return Z1, A1, params.w2 @ A1 + params.b2[:, None]


def param_grads(delta1: Array, delta2: Array, X: Array, A1: Array,
                compute_dtype: Optional[DTypeLike] = None, is_feature_major: bool = False
                ) -> Params:
  """Params(Δ1ᵀ X, Σ_rows Δ1, Δ2ᵀ A1, Σ_rows Δ2): the batched outer products; from
  Δ1ᵀ, Δ2ᵀ and A1ᵀ where is_feature_major. compute_dtype is what Δ1ᵀ X reads."""
  if is_feature_major:
    return Params(w1=matmul(delta1, X, compute_dtype), b1=jnp.sum(delta1, axis=1),
                  w2=delta2 @ A1.T, b2=jnp.sum(delta2, axis=1))
  return Params(w1=matmul(delta1.T, X, compute_dtype), b1=jnp.sum(delta1, axis=0),
                w2=delta2.T @ A1, b2=jnp.sum(delta2, axis=0))


def _prepare(params: Params, X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike]
             ) -> tuple[Array, Array, Array]:
  """Checks the inputs; returns X in the params' dtype, targets Y (B, K), ŵ (B,)."""
  _, _, _, k = checks.check_all(params, X, y, weights)
  dtype = params.w1.dtype
  Y = losses.targets(jnp.asarray(y), k, dtype)
  X = jnp.asarray(X, dtype)
  return X, Y, losses.mean_weights(weights, X.shape[0], dtype)


def value_and_grads(params: Params, X: ArrayLike, y: ArrayLike,
                    weights: Optional[ArrayLike] = None, *,
                    compute_dtype: Optional[DTypeLike] = None) -> tuple[Array, Params]:
  """MANUAL (loss, Params of gradients) of mj.loss, by the batched closed form above.

  X (B, D); y int labels (B,) or targets (B, K); weights (B,) optional; compute_dtype
  (bfloat16) is what the two H × D matmuls read (W1 Xᵀ and Δ1ᵀ X, nearly all the FLOPs);
  the other three and everything else stay in the params' dtype.
  """
  (loss, _), g = _manual_value_and_grads_with_logits(params, X, y, weights, compute_dtype)
  return loss, g


def _manual_value_and_grads_with_logits(params: Params, X: ArrayLike, y: ArrayLike,
                                        weights: Optional[ArrayLike],
                                        compute_dtype: Optional[DTypeLike]
                                        ) -> tuple[tuple[Array, Array], Params]:
  Xd, Y, w = _prepare(params, X, y, weights)
  fm = feature_major(params, compute_dtype)
  Z1, A1, Z2 = batch_activations(params, Xd, compute_dtype, fm)
  logits = Z2.T if fm else Z2                                             # (B, K)
  loss = jnp.sum(w * losses.cross_entropy(logits, Y))
  if fm:
    delta2 = w[None, :] * output_delta(Z2, Y.T, axis=0)                   # Δ2ᵀ (K, B)
  else:
    delta2 = w[:, None] * output_delta(Z2, Y)                             # Δ2 (B, K)
  delta1 = hidden_delta(params, delta2, Z1, fm)                   # Δ1 (B, H) or Δ1ᵀ
  return (loss, logits), param_grads(delta1, delta2, Xd, A1, compute_dtype, fm)


def grads(params: Params, X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike] = None,
          *, compute_dtype: Optional[DTypeLike] = None) -> Params:
  """MANUAL gradients of mj.loss (Params, same shapes as params); see value_and_grads."""
  return value_and_grads(params, X, y, weights, compute_dtype=compute_dtype)[1]


def autodiff_value_and_grads(params: Params, X: ArrayLike, y: ArrayLike,
                             weights: Optional[ArrayLike] = None, *,
                             compute_dtype: Optional[DTypeLike] = None
                             ) -> tuple[Array, Params]:
  """jax.value_and_grad(mj.loss): the reference the manual gradients are tested against."""
  return jax.value_and_grad(losses.loss)(params, X, y, weights, compute_dtype=compute_dtype)


def autodiff_grads(params: Params, X: ArrayLike, y: ArrayLike,
                   weights: Optional[ArrayLike] = None, *,
                   compute_dtype: Optional[DTypeLike] = None) -> Params:
  """jax.grad(mj.loss) -> Params."""
  return jax.grad(losses.loss)(params, X, y, weights, compute_dtype=compute_dtype)


def example_grads(params: Params, x: Array, y: Array) -> Params:
  """MANUAL gradient of ONE example's loss L(x (D,), y (K,) targets) -> Params."""
  z1, a1, z2 = model.forward_pass(params, x)
  delta2 = output_delta(z2, y)                         # δ2 (K,)
  delta1 = hidden_delta(params, delta2, z1)            # δ1 (H,)
  return Params(w1=jnp.outer(delta1, x), b1=delta1, w2=jnp.outer(delta2, a1), b2=delta2)


def _example_loss(params: Params, x: Array, y: Array) -> Array:
  """ONE example's cross-entropy, x (D,), y (K,) targets -> scalar."""
  return losses.cross_entropy(model.forward_pass(params, x)[2], y)


def per_example_grads(params: Params, X: ArrayLike, y: ArrayLike, method: str = "manual"
                      ) -> Params:
  """Gradient of each example's own loss L_i, Params with a leading B axis.

  method "manual": jax.vmap of `example_grads`; "autodiff": jax.vmap of jax.grad of
  one example's loss. Their weighted mean over the batch is `grads`. Materialises
  B·H·D numbers: for norms alone use `per_example_grad_norms`.
  """
  if method not in ("manual", "autodiff"):
    raise ValueError(f"per_example_grads: method must be 'manual' or 'autodiff', "
                     f"got {method!r}.")
  Xd, Y, _ = _prepare(params, X, y, None)
  one_example = example_grads if method == "manual" else jax.grad(_example_loss)
  return jax.vmap(one_example, in_axes=(None, 0, 0))(params, Xd, Y)


def layer_grad_sq_norms(delta1: Array, delta2: Array, X: Array, A1: Array,
                        is_feature_major: bool = False) -> tuple[Array, Array]:
  """(‖∇_{W1,b1} L_i‖², ‖∇_{W2,b2} L_i‖²), each (B,), from Δ1 (B, H), Δ2 (B, K) of each
  example's own loss, X (B, D) and A1 (B, H) (Δ1ᵀ, Δ2ᵀ, A1ᵀ where is_feature_major),
  without forming ∇L_i.

  ∇W1 = δ1 xᵀ and ∇W2 = δ2 a1ᵀ are outer products, and ‖u vᵀ‖² = ‖u‖²‖v‖², so
      ‖∇_{W1,b1} L_i‖² = ‖δ1_i‖² (‖x_i‖² + 1),  ‖∇_{W2,b2} L_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1).
  """
  def sq(a: Array, axis: int = 0 if is_feature_major else -1) -> Array:
    return jnp.sum(a * a, axis=axis)

  return sq(delta1) * (sq(X, axis=-1) + 1), sq(delta2) * (sq(A1) + 1)


def per_example_grad_norms(params: Params, X: ArrayLike, y: ArrayLike) -> Array:
  """‖∇L_i‖ over all parameters for each example, (B,), without forming ∇L_i:
  ‖g_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1) + ‖δ1_i‖² (‖x_i‖² + 1) (layer_grad_sq_norms).
  """
  Xd, Y, _ = _prepare(params, X, y, None)
  Z1, A1, Z2 = batch_activations(params, Xd)
  delta2 = output_delta(Z2, Y)
  delta1 = hidden_delta(params, delta2, Z1)
  sq1, sq2 = layer_grad_sq_norms(delta1, delta2, Xd, A1)
  return jnp.sqrt(sq1 + sq2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _manual_vjp_loss(params: Params, X: Array, Y: Array, weights: Optional[Array],
                     compute_dtype: Optional[DTypeLike]) -> tuple[Array, Array]:
  """(loss, logits Z2): the logits are an output too, so a train step can count hits."""
  return _manual_vjp_forward(params, X, Y, weights, compute_dtype)[0]


def _manual_vjp_forward(params: Params, X: Array, Y: Array, weights: Optional[Array],
                        compute_dtype: Optional[DTypeLike]) -> tuple[tuple[Array, Array], tuple]:
  w = losses.mean_weights(weights, X.shape[0], params.w1.dtype)
  Z1, A1, Z2 = batch_activations(params, X, compute_dtype)
  per_example = losses.cross_entropy(Z2, Y)
  loss = jnp.sum(w * per_example)
  return (loss, Z2), (params, X, Y, weights, w, Z1, A1, Z2, per_example, loss)


def _manual_vjp_backward(compute_dtype: Optional[DTypeLike], residuals: tuple,
                         cotangents: tuple[Array, Array]) -> tuple:
  """Cotangents of (params, X, Y, weights), every one by its closed form."""
  params, X, Y, weights, w, Z1, A1, Z2, per_example, loss = residuals
  g, g_z2 = cotangents   # g_z2 = 0 unless the caller differentiates through the logits
  delta2 = (g * w)[:, None] * output_delta(Z2, Y) + g_z2
  delta1 = hidden_delta(params, delta2, Z1)
  d_params = param_grads(delta1, delta2, X, A1, compute_dtype)
  d_X = matmul(delta1, params.w1, compute_dtype)      # ∂L/∂x = W1ᵀ δ1
  # ∂L_i/∂y_k = logsumexp(z2_i) − z2_ik = −log p_ik.
  d_Y = (g * w)[:, None] * (jax.nn.logsumexp(Z2, axis=-1, keepdims=True) - Z2)
  d_weights = None
  if weights is not None:                              # L = Σ w_i L_i / Σ w_i
    total = jnp.sum(weights)
    d_weights = (g * (per_example - loss) / jnp.where(total > 0, total, 1)).astype(
        weights.dtype)
  return d_params, d_X, d_Y, d_weights


_manual_vjp_loss.defvjp(_manual_vjp_forward, _manual_vjp_backward)


def loss_manual_vjp(params: Params, X: ArrayLike, y: ArrayLike,
                    weights: Optional[ArrayLike] = None, *,
                    compute_dtype: Optional[DTypeLike] = None) -> Array:
  """mj.loss as a jax.custom_vjp whose backward pass IS the manual formula.

  jax.grad, jax.vmap and optax then run on the hand-derived gradient. Gradients with
  respect to X, float targets y and weights are closed forms too. Reverse mode only, by
  construction: a custom_vjp defines no forward-mode rule, so jax.jvp, jax.jacfwd and
  jax.hessian of it raise JAX's "can't apply forward-mode autodiff (jvp) to a
  custom_vjp function"; use mj.loss for those.
  """
  return _loss_and_logits_manual_vjp(params, X, y, weights, compute_dtype=compute_dtype)[0]


def _loss_and_logits_manual_vjp(params: Params, X: ArrayLike, y: ArrayLike,
                                weights: Optional[ArrayLike] = None, *,
                                compute_dtype: Optional[DTypeLike] = None
                                ) -> tuple[Array, Array]:
  """(loss_manual_vjp, logits Z2 (B, K)), both through the custom_vjp."""
  _, _, _, k = checks.check_all(params, X, y, weights)
  Y = jnp.asarray(y)
  if Y.ndim == 1:  # int labels carry no gradient: close over them as one-hot targets
    Y = jax.lax.stop_gradient(losses.targets(Y, k, params.w1.dtype))
  w = None if weights is None else jnp.asarray(weights, params.w1.dtype)
  return _manual_vjp_loss(params, jnp.asarray(X, params.w1.dtype), Y, w, compute_dtype)


def value_and_grads_with_logits(params: Params, X: ArrayLike, y: ArrayLike,
                                weights: Optional[ArrayLike] = None, *,
                                method: str = "manual",
                                compute_dtype: Optional[DTypeLike] = None
                                ) -> tuple[tuple[Array, Array], Params]:
  """((loss, logits Z2 (B, K)), Params of gradients), by `method`:

  "manual" (the closed form), "autodiff" (jax.value_and_grad of mj.loss) or
  "manual_vjp" (jax.value_and_grad of loss_manual_vjp). A train step takes its
  accuracy from these logits instead of running the forward pass twice.
  """
  if method == "manual":
    return _manual_value_and_grads_with_logits(params, X, y, weights, compute_dtype)
  loss_fn = {"autodiff": losses.loss_and_logits,
             "manual_vjp": _loss_and_logits_manual_vjp}.get(method)
  if loss_fn is None:
    raise ValueError(f"method must be 'manual', 'autodiff' or 'manual_vjp', got {method!r}.")
  return jax.value_and_grad(loss_fn, has_aux=True)(params, X, y, weights,
                                                   compute_dtype=compute_dtype)
