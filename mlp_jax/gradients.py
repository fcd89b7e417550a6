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
"""

import functools

import jax
import jax.numpy as jnp

from mlp_jax import checks
from mlp_jax import losses
from mlp_jax import model
from mlp_jax.model import Params
from mlp_jax.model import matmul


def output_delta(z2, Y):
  """δ2 = ∂L/∂z2 = softmax(z2) Σy − y, for z2, Y of shape (K,) or (B, K)."""
  return jax.nn.softmax(z2, axis=-1) * jnp.sum(Y, axis=-1, keepdims=True) - Y


def relu_derivative(z1, dtype):
  """ReLU'(z1) = 1[z1 ≥ 0], written as 1 − 1[z1 < 0] to match model.relu: a NaN z1
  passes (as autodiff of model.relu passes it), so NaN stays NaN in δ1 too."""
  return (~(z1 < 0)).astype(dtype)


def hidden_delta(params, delta2, z1, compute_dtype=None):
  """δ1 = ∂L/∂z1 = (W2ᵀ δ2) ⊙ 1[z1 ≥ 0], for δ2 (K,) or (B, K) and z1 (H,) or (B, H)."""
  return matmul(delta2, params.w2, compute_dtype) * relu_derivative(z1, delta2.dtype)


def batch_activations(params, X, compute_dtype=None):
  """Z1 (B, H), A1 (B, H), Z2 (B, K): model.forward_pass vmapped over the rows of X."""
  return jax.vmap(model.forward_pass, in_axes=(None, 0, None))(params, X, compute_dtype)


def param_grads(delta1, delta2, X, A1, compute_dtype=None):
  """Params(Δ1ᵀ X, Σ_rows Δ1, Δ2ᵀ A1, Σ_rows Δ2): the batched outer products.

  Δ2ᵀ A1 (K × B × H, K the classes: a few % of the step's FLOPs) stays in the params'
  dtype: XLA's CPU runtime has no bfloat16 kernel for that shape under jit (it fails
  with "Unsupported element type for DotThunk: BF16 x BF16 = F32").
  """
  return Params(w1=matmul(delta1.T, X, compute_dtype), b1=jnp.sum(delta1, axis=0),
                w2=matmul(delta2.T, A1), b2=jnp.sum(delta2, axis=0))


def _prepare(params, X, y, weights):
  """Checks the inputs; returns X in the params' dtype, targets Y (B, K), ŵ (B,)."""
  _, _, _, k = checks.check_all(params, X, y, weights)
  dtype = params.w1.dtype
  Y = losses.targets(jnp.asarray(y), k, dtype)
  return X.astype(dtype), Y, losses.mean_weights(weights, X.shape[0], dtype)


def value_and_grads(params, X, y, weights=None, *, compute_dtype=None):
  """MANUAL (loss, Params of gradients) of mj.loss, by the batched closed form above.

  X (B, D); y int labels (B,) or targets (B, K); weights (B,) optional; compute_dtype
  (bfloat16) is what the five matmuls read, everything else stays in the params' dtype.
  """
  (loss, _), g = _manual_value_and_grads_with_logits(params, X, y, weights, compute_dtype)
  return loss, g


def _manual_value_and_grads_with_logits(params, X, y, weights, compute_dtype):
  X, Y, w = _prepare(params, X, y, weights)
  Z1, A1, Z2 = batch_activations(params, X, compute_dtype)
  loss = jnp.sum(w * losses.cross_entropy(Z2, Y))
  delta2 = w[:, None] * output_delta(Z2, Y)                   # Δ2 (B, K)
  delta1 = hidden_delta(params, delta2, Z1, compute_dtype)    # Δ1 (B, H)
  return (loss, Z2), param_grads(delta1, delta2, X, A1, compute_dtype)


def grads(params, X, y, weights=None, *, compute_dtype=None):
  """MANUAL gradients of mj.loss (Params, same shapes as params); see value_and_grads."""
  return value_and_grads(params, X, y, weights, compute_dtype=compute_dtype)[1]


def autodiff_value_and_grads(params, X, y, weights=None, *, compute_dtype=None):
  """jax.value_and_grad(mj.loss): the reference the manual gradients are tested against."""
  return jax.value_and_grad(losses.loss)(params, X, y, weights, compute_dtype=compute_dtype)


def autodiff_grads(params, X, y, weights=None, *, compute_dtype=None):
  """jax.grad(mj.loss) -> Params."""
  return jax.grad(losses.loss)(params, X, y, weights, compute_dtype=compute_dtype)


def example_grads(params, x, y):
  """MANUAL gradient of ONE example's loss L(x (D,), y (K,) targets) -> Params."""
  z1, a1, z2 = model.forward_pass(params, x)
  delta2 = output_delta(z2, y)                         # δ2 (K,)
  delta1 = hidden_delta(params, delta2, z1)            # δ1 (H,)
  return Params(w1=jnp.outer(delta1, x), b1=delta1, w2=jnp.outer(delta2, a1), b2=delta2)


def _example_loss(params, x, y):
  """ONE example's cross-entropy, x (D,), y (K,) targets -> scalar."""
  return losses.cross_entropy(model.forward_pass(params, x)[2], y)


def per_example_grads(params, X, y, method="manual"):
  """Gradient of each example's own loss L_i, Params with a leading B axis.

  method "manual": jax.vmap of `example_grads`; "autodiff": jax.vmap of jax.grad of
  one example's loss. Their weighted mean over the batch is `grads`. Materialises
  B·H·D numbers: for norms alone use `per_example_grad_norms`.
  """
  if method not in ("manual", "autodiff"):
    raise ValueError(f"per_example_grads: method must be 'manual' or 'autodiff', "
                     f"got {method!r}.")
  X, Y, _ = _prepare(params, X, y, None)
  one_example = example_grads if method == "manual" else jax.grad(_example_loss)
  return jax.vmap(one_example, in_axes=(None, 0, 0))(params, X, Y)


def layer_grad_sq_norms(delta1, delta2, X, A1):
  """(‖∇_{W1,b1} L_i‖², ‖∇_{W2,b2} L_i‖²), each (B,), from Δ1 (B, H), Δ2 (B, K) of each
  example's own loss, X (B, D) and A1 (B, H), without forming ∇L_i.

  ∇W1 = δ1 xᵀ and ∇W2 = δ2 a1ᵀ are outer products, and ‖u vᵀ‖² = ‖u‖²‖v‖², so
      ‖∇_{W1,b1} L_i‖² = ‖δ1_i‖² (‖x_i‖² + 1),  ‖∇_{W2,b2} L_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1).
  """
  def sq(a):
    return jnp.sum(a * a, axis=-1)

  return sq(delta1) * (sq(X) + 1), sq(delta2) * (sq(A1) + 1)


def per_example_grad_norms(params, X, y):
  """‖∇L_i‖ over all parameters for each example, (B,), without forming ∇L_i:
  ‖g_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1) + ‖δ1_i‖² (‖x_i‖² + 1) (layer_grad_sq_norms).
  """
  X, Y, _ = _prepare(params, X, y, None)
  Z1, A1, Z2 = batch_activations(params, X)
  delta2 = output_delta(Z2, Y)
  delta1 = hidden_delta(params, delta2, Z1)
  sq1, sq2 = layer_grad_sq_norms(delta1, delta2, X, A1)
  return jnp.sqrt(sq1 + sq2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _manual_vjp_loss(params, X, Y, weights, compute_dtype):
  """(loss, logits Z2): the logits are an output too, so a train step can count hits."""
  return _manual_vjp_forward(params, X, Y, weights, compute_dtype)[0]


def _manual_vjp_forward(params, X, Y, weights, compute_dtype):
  w = losses.mean_weights(weights, X.shape[0], params.w1.dtype)
  Z1, A1, Z2 = batch_activations(params, X, compute_dtype)
  per_example = losses.cross_entropy(Z2, Y)
  loss = jnp.sum(w * per_example)
  return (loss, Z2), (params, X, Y, weights, w, Z1, A1, Z2, per_example, loss)


def _manual_vjp_backward(compute_dtype, residuals, cotangents):
  """Cotangents of (params, X, Y, weights), every one by its closed form."""
  params, X, Y, weights, w, Z1, A1, Z2, per_example, loss = residuals
  g, g_z2 = cotangents   # g_z2 = 0 unless the caller differentiates through the logits
  delta2 = (g * w)[:, None] * output_delta(Z2, Y) + g_z2
  delta1 = hidden_delta(params, delta2, Z1, compute_dtype)
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


def loss_manual_vjp(params, X, y, weights=None, *, compute_dtype=None):
  """mj.loss as a jax.custom_vjp whose backward pass IS the manual formula.

  jax.grad, jax.vmap and optax then run on the hand-derived gradient. Gradients with
  respect to X, float targets y and weights are closed forms too. Reverse mode only, by
  construction: a custom_vjp defines no forward-mode rule, so jax.jvp, jax.jacfwd and
  jax.hessian of it raise JAX's "can't apply forward-mode autodiff (jvp) to a
  custom_vjp function"; use mj.loss for those.
  """
  return _loss_and_logits_manual_vjp(params, X, y, weights, compute_dtype=compute_dtype)[0]


def _loss_and_logits_manual_vjp(params, X, y, weights=None, *, compute_dtype=None):
  """(loss_manual_vjp, logits Z2 (B, K)), both through the custom_vjp."""
  _, _, _, k = checks.check_all(params, X, y, weights)
  y = jnp.asarray(y)
  if y.ndim == 1:  # int labels carry no gradient: close over them as one-hot targets
    y = jax.lax.stop_gradient(losses.targets(y, k, params.w1.dtype))
  if weights is not None:
    weights = jnp.asarray(weights, params.w1.dtype)
  return _manual_vjp_loss(params, X.astype(params.w1.dtype), y, weights, compute_dtype)


def value_and_grads_with_logits(params, X, y, weights=None, *, method="manual",
                                compute_dtype=None):
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
