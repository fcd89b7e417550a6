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

Each formula is written once, for any layout of the batch (mlp_jax/layout.py): with
examples as rows (BATCH_MAJOR, as above), as columns (FEATURE_MAJOR: Z1ᵀ = W1 Xᵀ + b1,
Δ1ᵀ = (W2ᵀ Δ2ᵀ) ⊙ 1[Z1ᵀ ≥ 0], dW1 = Δ1ᵀ X), or one example alone (ONE_EXAMPLE, the
lines above). layout.choose_layout picks the batch's layout by dtype and machine.
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
from mlp_jax.layout import Layout
from mlp_jax.layout import ONE_EXAMPLE
from mlp_jax.layout import along_examples
from mlp_jax.layout import as_rows
from mlp_jax.layout import choose_layout
from mlp_jax.layout import contract
from mlp_jax.layout import from_rows
from mlp_jax.layout import sum_examples
from mlp_jax.layout import sum_features
from mlp_jax.model import Params


def output_delta(z2: Array, Y: Array, class_axis: int = -1) -> Array:
  """δ2 = ∂L/∂z2 = softmax(z2) Σy − y, for logits z2 and targets Y of the same axes,
  the classes along `class_axis` (Layout.class_axis)."""
  return jax.nn.softmax(z2, axis=class_axis) * jnp.sum(Y, axis=class_axis,
                                                       keepdims=True) - Y


def relu_derivative(z1: Array, dtype: DTypeLike) -> Array:
  """ReLU'(z1) = 1[z1 ≥ 0], written as 1 − 1[z1 < 0] to match model.relu: a NaN z1
  passes (as autodiff of model.relu passes it), so NaN stays NaN in δ1 too."""
  return (~(z1 < 0)).astype(dtype)


def hidden_delta(params: Params, delta2: Array, z1: Array, layout: Layout = ONE_EXAMPLE
                 ) -> Array:
  """δ1 = ∂L/∂z1 = (W2ᵀ δ2) ⊙ 1[z1 ≥ 0], from δ2 (layout.output) and z1 (layout.hidden)."""
  back = contract(f"kh,{layout.output}->{layout.hidden}", params.w2, delta2)
  return back * relu_derivative(z1, delta2.dtype)


def param_grads(delta1: Array, delta2: Array, X: Array, A1: Array,
                layout: Layout = ONE_EXAMPLE, compute_dtype: Optional[DTypeLike] = None
                ) -> Params:
  """Params(Σ δ1 xᵀ, Σ δ1, Σ δ2 a1ᵀ, Σ δ2): the outer products summed over the examples
  (one example: δ1 xᵀ, δ1, δ2 a1ᵀ, δ2). compute_dtype is what Σ δ1 xᵀ reads."""
  L = layout
  return Params(w1=contract(f"{L.hidden},{L.input}->hd", delta1, X, compute_dtype),
                b1=sum_examples(delta1, L.hidden),
                w2=contract(f"{L.output},{L.hidden}->kh", delta2, A1),
                b2=sum_examples(delta2, L.output))


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
                    compute_dtype: Optional[DTypeLike] = None,
                    layout: Optional[Layout] = None) -> tuple[Array, Params]:
  """MANUAL (loss, Params of gradients) of mj.loss, by the batched closed form above.

  X (B, D); y int labels (B,) or targets (B, K); weights (B,) optional; compute_dtype
  (bfloat16) is what the two H × D matmuls read (W1 Xᵀ and Δ1ᵀ X, nearly all the FLOPs);
  the other three and everything else stay in the params' dtype. layout: BATCH_MAJOR or
  FEATURE_MAJOR (mlp_jax.layout), by default layout.choose_layout's, the faster one.
  """
  (loss, _), g = _manual_value_and_grads_with_logits(params, X, y, weights, compute_dtype,
                                                     layout)
  return loss, g


def _manual_value_and_grads_with_logits(params: Params, X: ArrayLike, y: ArrayLike,
                                        weights: Optional[ArrayLike],
                                        compute_dtype: Optional[DTypeLike],
                                        layout: Optional[Layout]
                                        ) -> tuple[tuple[Array, Array], Params]:
  Xd, Y, w = _prepare(params, X, y, weights)
  L = layout or choose_layout(params.w1.dtype, compute_dtype)
  Z1, A1, Z2 = model.activations(params, Xd, L, compute_dtype)
  logits = as_rows(Z2, L.output)                                   # (B, K)
  loss = jnp.sum(w * losses.cross_entropy(logits, Y))
  delta2 = (along_examples(w, L.output)
            * output_delta(Z2, from_rows(Y, L.output), L.class_axis))   # ŵ ⊙ Δ2
  delta1 = hidden_delta(params, delta2, Z1, L)
  return (loss, logits), param_grads(delta1, delta2, Xd, A1, L, compute_dtype)


def grads(params: Params, X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike] = None,
          *, compute_dtype: Optional[DTypeLike] = None, layout: Optional[Layout] = None
          ) -> Params:
  """MANUAL gradients of mj.loss (Params, same shapes as params); see value_and_grads."""
  return value_and_grads(params, X, y, weights, compute_dtype=compute_dtype,
                         layout=layout)[1]


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
  """MANUAL gradient of ONE example's loss L(x (D,), y (K,) targets) -> Params: the
  batch's formulas of ONE_EXAMPLE (δ1 xᵀ, δ1, δ2 a1ᵀ, δ2)."""
  z1, a1, z2 = model.forward_pass(params, x)
  delta2 = output_delta(z2, y)                         # δ2 (K,)
  delta1 = hidden_delta(params, delta2, z1)            # δ1 (H,)
  return param_grads(delta1, delta2, x, a1)


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
                        layout: Layout) -> tuple[Array, Array]:
  """(‖∇_{W1,b1} L_i‖², ‖∇_{W2,b2} L_i‖²), each (B,), from each example's own δ1, δ2
  (the deltas of an unweighted sum), X and A1 in `layout`, without forming ∇L_i.

  ∇W1 = δ1 xᵀ and ∇W2 = δ2 a1ᵀ are outer products, and ‖u vᵀ‖² = ‖u‖²‖v‖², so
      ‖∇_{W1,b1} L_i‖² = ‖δ1_i‖² (‖x_i‖² + 1),  ‖∇_{W2,b2} L_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1).
  """
  def sq(a: Array, axes: str) -> Array:
    return sum_features(a * a, axes)

  L = layout
  return (sq(delta1, L.hidden) * (sq(X, L.input) + 1),
          sq(delta2, L.output) * (sq(A1, L.hidden) + 1))


def per_example_grad_norms(params: Params, X: ArrayLike, y: ArrayLike, *,
                           layout: Optional[Layout] = None) -> Array:
  """‖∇L_i‖ over all parameters for each example, (B,), without forming ∇L_i:
  ‖g_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1) + ‖δ1_i‖² (‖x_i‖² + 1) (layer_grad_sq_norms).
  layout as in value_and_grads.
  """
  Xd, Y, _ = _prepare(params, X, y, None)
  L = layout or choose_layout(params.w1.dtype, None)
  Z1, A1, Z2 = model.activations(params, Xd, L)
  delta2 = output_delta(Z2, from_rows(Y, L.output), L.class_axis)
  delta1 = hidden_delta(params, delta2, Z1, L)
  sq1, sq2 = layer_grad_sq_norms(delta1, delta2, Xd, A1, L)
  return jnp.sqrt(sq1 + sq2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _manual_vjp_loss(params: Params, X: Array, Y: Array, weights: Optional[Array],
                     compute_dtype: Optional[DTypeLike], layout: Layout
                     ) -> tuple[Array, Array]:
  """(loss, logits Z2): the logits are an output too, so a train step can count hits."""
  return _manual_vjp_forward(params, X, Y, weights, compute_dtype, layout)[0]


def _manual_vjp_forward(params: Params, X: Array, Y: Array, weights: Optional[Array],
                        compute_dtype: Optional[DTypeLike], layout: Layout
                        ) -> tuple[tuple[Array, Array], tuple]:
  w = losses.mean_weights(weights, X.shape[0], params.w1.dtype)
  L = layout
  Z1, A1, Z2 = model.activations(params, X, L, compute_dtype)
  logits = as_rows(Z2, L.output)                                   # (B, K)
  per_example = losses.cross_entropy(logits, Y)
  loss = jnp.sum(w * per_example)
  return (loss, logits), (params, X, Y, weights, w, Z1, A1, logits, per_example, loss)


def _manual_vjp_backward(compute_dtype: Optional[DTypeLike], layout: Layout,
                         residuals: tuple, cotangents: tuple[Array, Array]) -> tuple:
  """Cotangents of (params, X, Y, weights), every one by its closed form."""
  params, X, Y, weights, w, Z1, A1, Z2, per_example, loss = residuals
  g, g_z2 = cotangents   # g_z2 = 0 unless the caller differentiates through the logits
  L = layout
  delta2 = from_rows((g * w)[:, None] * output_delta(Z2, Y) + g_z2, L.output)
  delta1 = hidden_delta(params, delta2, Z1, L)
  d_params = param_grads(delta1, delta2, X, A1, L, compute_dtype)
  d_X = contract(f"{L.hidden},hd->bd", delta1, params.w1, compute_dtype)  # ∂L/∂x = W1ᵀ δ1
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
                    compute_dtype: Optional[DTypeLike] = None,
                    layout: Optional[Layout] = None) -> Array:
  """mj.loss as a jax.custom_vjp whose backward pass IS the manual formula.

  jax.grad, jax.vmap and optax then run on the hand-derived gradient. Gradients with
  respect to X, float targets y and weights are closed forms too. Reverse mode only, by
  construction: a custom_vjp defines no forward-mode rule, so jax.jvp, jax.jacfwd and
  jax.hessian of it raise JAX's "can't apply forward-mode autodiff (jvp) to a
  custom_vjp function"; use mj.loss for those. compute_dtype and layout as in
  value_and_grads.
  """
  return _loss_and_logits_manual_vjp(params, X, y, weights, compute_dtype=compute_dtype,
                                     layout=layout)[0]


def _loss_and_logits_manual_vjp(params: Params, X: ArrayLike, y: ArrayLike,
                                weights: Optional[ArrayLike] = None, *,
                                compute_dtype: Optional[DTypeLike] = None,
                                layout: Optional[Layout] = None) -> tuple[Array, Array]:
  """(loss_manual_vjp, logits Z2 (B, K)), both through the custom_vjp."""
  _, _, _, k = checks.check_all(params, X, y, weights)
  labels = jnp.asarray(y)
  Y = losses.targets(labels, k, params.w1.dtype)   # float targets in the params' dtype
  if labels.ndim == 1:  # int labels carry no gradient: close over them as one-hot targets
    Y = jax.lax.stop_gradient(Y)
  w = None if weights is None else jnp.asarray(weights, params.w1.dtype)
  return _manual_vjp_loss(params, jnp.asarray(X, params.w1.dtype), Y, w, compute_dtype,
                          layout or choose_layout(params.w1.dtype, compute_dtype))


def value_and_grads_with_logits(params: Params, X: ArrayLike, y: ArrayLike,
                                weights: Optional[ArrayLike] = None, *,
                                method: str = "manual",
                                compute_dtype: Optional[DTypeLike] = None,
                                layout: Optional[Layout] = None
                                ) -> tuple[tuple[Array, Array], Params]:
  """((loss, logits Z2 (B, K)), Params of gradients), by `method`:

  "manual" (the closed form), "autodiff" (jax.value_and_grad of mj.loss) or
  "manual_vjp" (jax.value_and_grad of loss_manual_vjp); layout is the manual passes'
  (autodiff's is jax.grad's own). A train step takes its accuracy from these logits
  instead of running the forward pass twice.
  """
  if method == "manual":
    return _manual_value_and_grads_with_logits(params, X, y, weights, compute_dtype, layout)
  if method == "manual_vjp":
    return jax.value_and_grad(_loss_and_logits_manual_vjp, has_aux=True)(
        params, X, y, weights, compute_dtype=compute_dtype, layout=layout)
  if method != "autodiff":
    raise ValueError(f"method must be 'manual', 'autodiff' or 'manual_vjp', got {method!r}.")
  return jax.value_and_grad(losses.loss_and_logits, has_aux=True)(
      params, X, y, weights, compute_dtype=compute_dtype)
