"""The gradients of mj.loss: hand-derived (manual) next to jax.grad (autodiff).

One example (docs/derivation.md derives each line; tests/test_gradients.py proves them
equal to jax.grad and to finite differences):

    δ2 = ∂L/∂z2 = p Σy − y               (= p − y for one-hot y)           (K,)
    ∂L/∂W2 = δ2 a1ᵀ      ∂L/∂b2 = δ2                                  (K, H), (K,)
    δ1 = ∂L/∂z1 = (W2ᵀ δ2) ⊙ f′(z1)        (f′(z1) = 1[z1 ≥ 0] for ReLU)    (H,)
    ∂L/∂W1 = δ1 xᵀ       ∂L/∂b1 = δ1                                  (H, D), (H,)

A batch X (B, D), one example per row, with mean weights ŵ (B,) (ŵ_i = 1/B unweighted):
row i of each matrix below is that example's vector above, so the same lines read

    Δ2 = ŵ ⊙ (P Σy − Y) (B, K)    dW2 = Δ2ᵀ A1    db2 = Σ_rows Δ2
    Δ1 = (Δ2 W2) ⊙ f′(Z1) (B, H)    dW1 = Δ1ᵀ X    db1 = Σ_rows Δ1

f is the network's activation (a `network.Network`; f′ its hand-written derivative).
`deltas` is the forward pass and these deltas, written once; `param_grads` the four
sums. value_and_grads (`backprop`), the per-example gradients and norms and the DP
clipped sum (privacy.py) call `deltas`; loss_manual_vjp's backward pass, whose Δ2 comes
from its cotangents, calls `hidden_delta` and `param_grads`. A faster form of the same
pass for some CPUs lives apart, in mlp_jax/core/feature_major.py; `manual_pass` is the
one place that runs it, in the layout the Network gives.
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from mlp_jax.core import checks, feature_major, losses, model
from mlp_jax.core.model import Params, matmul
from mlp_jax.core.network import BATCH_MAJOR, FEATURE_MAJOR, Network


def output_delta(Z2: Array, Y: Array) -> Array:
  """Δ2 = ∂L/∂Z2 = softmax(Z2) Σy − Y, row by row: logits Z2 and targets Y (B, K)."""
  return jax.nn.softmax(Z2, axis=-1) * jnp.sum(Y, axis=-1, keepdims=True) - Y


def hidden_delta(net: Network, params: Params, delta2: Array, Z1: Array) -> Array:
  """Δ1 = ∂L/∂Z1 = (Δ2 W2) ⊙ f′(Z1) (B, H), row by row δ1 = (W2ᵀ δ2) ⊙ f′(z1)."""
  return (delta2 @ params.w2) * net.f_prime(Z1)


def param_grads(net: Network, delta1: Array, delta2: Array, X: Array, A1: Array
                ) -> Params:
  """Params(Δ1ᵀ X, Σ_rows Δ1, Δ2ᵀ A1, Σ_rows Δ2): each example's δ1 xᵀ, δ1, δ2 a1ᵀ, δ2
  summed over the rows. net.compute_dtype is what Δ1ᵀ X reads (model.matmul)."""
  return Params(w1=matmul(delta1.T, X, net.compute_dtype),
                b1=jnp.sum(delta1, axis=0),
                w2=delta2.T @ A1,
                b2=jnp.sum(delta2, axis=0))


class Deltas(NamedTuple):
  """A batch's forward pass and deltas, an example per row: Z1, A1 (B, H), Z2 (B, K),
  Δ2 (B, K), Δ1 (B, H)."""

  Z1: Array
  A1: Array
  Z2: Array
  delta2: Array
  delta1: Array


def deltas(net: Network, params: Params, X: Array, Y: Array, w: Optional[Array] = None
           ) -> Deltas:
  """The forward pass of X (B, D) and the deltas of targets Y (B, K): Δ2 = ŵ ⊙ (P Σy − Y)
  and Δ1 = (Δ2 W2) ⊙ f′(Z1); without ŵ (B,), each row is that example's own δ2, δ1."""
  Z1, A1, Z2 = model.activations(net, params, X)
  delta2 = output_delta(Z2, Y)
  if w is not None:
    delta2 = w[:, None] * delta2
  return Deltas(Z1, A1, Z2, delta2, hidden_delta(net, params, delta2, Z1))


def backprop(net: Network, params: Params, X: Array, Y: Array, w: Array
             ) -> tuple[tuple[Array, Array], Params]:
  """((loss, logits Z2 (B, K)), Params of gradients) of L = Σ_i ŵ_i L_i: the reference
  manual pass, for X (B, D) and targets Y (B, K) in the params' dtype and ŵ (B,)."""
  d = deltas(net, params, X, Y, w)
  loss = jnp.sum(w * losses.cross_entropy(d.Z2, Y))
  return (loss, d.Z2), param_grads(net, d.delta1, d.delta2, X, d.A1)


@functools.partial(jax.jit, static_argnums=(0,))
def manual_pass(net: Network, params: Params, X: Array, Y: Array, w: Array
                ) -> tuple[tuple[Array, Array], Params]:
  """`backprop`, or its feature-major kernel in the layout the Network gives
  (net.layout_for: the one asked for, else network.choose_layout's): the one place
  the manual value and gradients pick between them. Compiled: called outside jit, as
  value_and_grads is, it runs as one program, not op by op."""
  if net.layout_for(params.w1.dtype) == FEATURE_MAJOR:
    return feature_major.backprop(net, params, X, Y, w)
  return backprop(net, params, X, Y, w)


def _prepare(params: Params, X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike]
             ) -> tuple[Array, Array, Array]:
  """Checks the inputs; returns X in the params' dtype, targets Y (B, K), ŵ (B,)."""
  _, _, _, k = checks.check_all(params, X, y, weights)
  return _targets_and_weights(params.w1.dtype, k, *losses.as_arrays(X, y, weights))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _targets_and_weights(dtype: DTypeLike, k: int, X: Array, y: Array,
                         weights: Optional[Array]) -> tuple[Array, Array, Array]:
  Y = losses.targets(y, k, dtype)
  return X.astype(dtype), Y, losses.mean_weights(weights, X.shape[0], dtype)


def value_and_grads(params: Params, X: ArrayLike, y: ArrayLike,
                    weights: Optional[ArrayLike] = None, *, activation: str = "relu",
                    compute_dtype: Optional[DTypeLike] = None) -> tuple[Array, Params]:
  """MANUAL (loss, Params of gradients) of mj.loss, by the batched closed form above.

  X (B, D); y int labels (B,) or targets (B, K); weights (B,) optional; activation f of
  the hidden layer (network.ACTIVATIONS); compute_dtype (bfloat16) is what the two H × D
  matmuls read (X W1ᵀ and Δ1ᵀ X, nearly all the FLOPs); the other three and everything
  else stay in the params' dtype. It runs `backprop` or its feature-major kernel,
  whichever is faster on this machine (network.choose_layout; value_and_grads_with_logits
  fixes one).
  """
  net = Network(activation, compute_dtype)
  (loss, _), g = _manual_value_and_grads_with_logits(net, params, X, y, weights)
  return loss, g


def _manual_value_and_grads_with_logits(net: Network, params: Params, X: ArrayLike,
                                        y: ArrayLike, weights: Optional[ArrayLike]
                                        ) -> tuple[tuple[Array, Array], Params]:
  Xd, Y, w = _prepare(params, X, y, weights)
  return manual_pass(net, params, Xd, Y, w)


def grads(params: Params, X: ArrayLike, y: ArrayLike, weights: Optional[ArrayLike] = None,
          *, activation: str = "relu", compute_dtype: Optional[DTypeLike] = None) -> Params:
  """MANUAL gradients of mj.loss (Params, same shapes as params); see value_and_grads."""
  return value_and_grads(params, X, y, weights, activation=activation,
                         compute_dtype=compute_dtype)[1]


def autodiff_value_and_grads(params: Params, X: ArrayLike, y: ArrayLike,
                             weights: Optional[ArrayLike] = None, *,
                             activation: str = "relu",
                             compute_dtype: Optional[DTypeLike] = None
                             ) -> tuple[Array, Params]:
  """jax.value_and_grad(mj.loss): the reference the manual gradients are tested against."""
  Network(activation, compute_dtype)   # a bad setting refused here, not inside jax.grad
  return jax.value_and_grad(losses.loss)(params, X, y, weights, activation=activation,
                                         compute_dtype=compute_dtype)


def autodiff_grads(params: Params, X: ArrayLike, y: ArrayLike,
                   weights: Optional[ArrayLike] = None, *, activation: str = "relu",
                   compute_dtype: Optional[DTypeLike] = None) -> Params:
  """jax.grad(mj.loss) -> Params."""
  Network(activation, compute_dtype)   # a bad setting refused here, not inside jax.grad
  return jax.grad(losses.loss)(params, X, y, weights, activation=activation,
                               compute_dtype=compute_dtype)


def example_grads(net: Network, params: Params, x: Array, y: Array) -> Params:
  """MANUAL gradient of ONE example's loss L(x (D,), y (K,) targets) -> Params: `backprop`
  on a batch of that one example, whose sums over rows are δ1 xᵀ, δ1, δ2 a1ᵀ, δ2."""
  one = jnp.ones((1,), x.dtype)
  return backprop(net, params, x[None], y[None], one)[1]


def _example_loss(net: Network, params: Params, x: Array, y: Array) -> Array:
  """ONE example's cross-entropy, x (D,), y (K,) targets -> scalar."""
  return losses.cross_entropy(model.forward_pass(net, params, x)[2], y)


def per_example_grads(params: Params, X: ArrayLike, y: ArrayLike, method: str = "manual",
                      *, activation: str = "relu") -> Params:
  """Gradient of each example's own loss L_i, Params with a leading B axis.

  method "manual": jax.vmap of `example_grads`; "autodiff": jax.vmap of jax.grad of
  one example's loss. Their weighted mean over the batch is `grads`. Materialises
  B·H·D numbers: for norms alone use `per_example_grad_norms`.
  """
  if method not in ("manual", "autodiff"):
    raise ValueError(f"per_example_grads: method must be 'manual' or 'autodiff', "
                     f"got {method!r}.")
  net = Network(activation)
  Xd, Y, _ = _prepare(params, X, y, None)
  return _per_example_grads(net, params, Xd, Y, method)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _per_example_grads(net: Network, params: Params, X: Array, Y: Array, method: str
                       ) -> Params:
  """per_example_grads of X (B, D) and targets Y (B, K): Params with a leading B axis."""
  one_example = example_grads if method == "manual" else jax.grad(_example_loss, argnums=1)
  return jax.vmap(one_example, in_axes=(None, None, 0, 0))(net, params, X, Y)


def layer_grad_sq_norms(d: Deltas, X: Array) -> tuple[Array, Array]:
  """(‖∇_{W1,b1} L_i‖², ‖∇_{W2,b2} L_i‖²), each (B,), from each example's own δ1, δ2
  (the rows of unweighted `deltas`), X and A1, without forming ∇L_i.

  ∇W1 = δ1 xᵀ and ∇W2 = δ2 a1ᵀ are outer products, and ‖u vᵀ‖² = ‖u‖²‖v‖², so
      ‖∇_{W1,b1} L_i‖² = ‖δ1_i‖² (‖x_i‖² + 1),  ‖∇_{W2,b2} L_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1).
  """
  def sq(a: Array) -> Array:
    return jnp.sum(a * a, axis=-1)

  return sq(d.delta1) * (sq(X) + 1), sq(d.delta2) * (sq(d.A1) + 1)


def mean_grad_sq_norms(d: Deltas, X: Array, copies: int) -> tuple[Array, Array]:
  """layer_grad_sq_norms of each example's MEAN gradient over its `copies` rows (rows
  i·K .. i·K + K − 1 of `deltas` and X: K augmented copies of example i), (B,) each,
  without forming a gradient: with Gram matrices over the copies k, l,

      ‖(1/K) Σ_k δ1_k x_kᵀ‖² + ‖(1/K) Σ_k δ1_k‖² = (1/K²) Σ_kl (δ1_k·δ1_l)(x_k·x_l + 1),

  and the same of δ2 and a1 for W2, b2. One copy: layer_grad_sq_norms."""
  if copies == 1:
    return layer_grad_sq_norms(d, X)

  def gram(a: Array) -> Array:      # (B·K, n) -> (B, K, K)
    grouped = a.reshape(-1, copies, a.shape[-1])
    return jnp.einsum("bkn,bln->bkl", grouped, grouped)

  return (jnp.sum(gram(d.delta1) * (gram(X) + 1), axis=(1, 2)) / copies**2,
          jnp.sum(gram(d.delta2) * (gram(d.A1) + 1), axis=(1, 2)) / copies**2)


def per_example_grad_norms(params: Params, X: ArrayLike, y: ArrayLike, *,
                           activation: str = "relu") -> Array:
  """‖∇L_i‖ over all parameters for each example, (B,), without forming ∇L_i:
  ‖g_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1) + ‖δ1_i‖² (‖x_i‖² + 1) (layer_grad_sq_norms)."""
  net = Network(activation)
  Xd, Y, _ = _prepare(params, X, y, None)
  return _per_example_grad_norms(net, params, Xd, Y)


@functools.partial(jax.jit, static_argnums=(0,))
def _per_example_grad_norms(net: Network, params: Params, X: Array, Y: Array) -> Array:
  """per_example_grad_norms of X (B, D) and targets Y (B, K): ‖g_i‖ (B,)."""
  sq1, sq2 = layer_grad_sq_norms(deltas(net, params, X, Y), X)
  return jnp.sqrt(sq1 + sq2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _manual_vjp_loss(net: Network, params: Params, X: Array, Y: Array,
                     weights: Optional[Array]) -> tuple[Array, Array]:
  """(loss, logits Z2): the logits are an output too, so a train step can count hits."""
  return _manual_vjp_forward(net, params, X, Y, weights)[0]


def _manual_vjp_forward(net: Network, params: Params, X: Array, Y: Array,
                        weights: Optional[Array]) -> tuple[tuple[Array, Array], tuple]:
  w = losses.mean_weights(weights, X.shape[0], params.w1.dtype)
  Z1, A1, Z2 = model.activations(net, params, X)
  per_example = losses.cross_entropy(Z2, Y)
  loss = jnp.sum(w * per_example)
  return (loss, Z2), (params, X, Y, weights, w, Z1, A1, Z2, per_example, loss)


def _manual_vjp_backward(net: Network, residuals: tuple, cotangents: tuple[Array, Array]
                         ) -> tuple:
  """Cotangents of (params, X, Y, weights), every one by its closed form."""
  params, X, Y, weights, w, Z1, A1, Z2, per_example, loss = residuals
  g, g_z2 = cotangents   # g_z2 = 0 unless the caller differentiates through the logits
  delta2 = (g * w)[:, None] * output_delta(Z2, Y) + g_z2
  delta1 = hidden_delta(net, params, delta2, Z1)
  d_params = param_grads(net, delta1, delta2, X, A1)
  d_X = matmul(delta1, params.w1, net.compute_dtype)               # ∂L/∂x = W1ᵀ δ1
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
                    weights: Optional[ArrayLike] = None, *, activation: str = "relu",
                    compute_dtype: Optional[DTypeLike] = None) -> Array:
  """mj.loss as a jax.custom_vjp whose backward pass IS the manual formula.

  jax.grad, jax.vmap and optax then run on the hand-derived gradient. Gradients with
  respect to X, float targets y and weights are closed forms too. Reverse mode only, by
  construction: a custom_vjp defines no forward-mode rule, so jax.jvp and jax.jacfwd of
  it raise JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function"
  (jax.hessian, forward mode over the manual backward pass, works); use mj.loss for
  those. activation and compute_dtype as in value_and_grads.
  """
  net = Network(activation, compute_dtype)
  return _loss_and_logits_manual_vjp(net, params, X, y, weights)[0]


def _loss_and_logits_manual_vjp(net: Network, params: Params, X: ArrayLike, y: ArrayLike,
                                weights: Optional[ArrayLike] = None
                                ) -> tuple[Array, Array]:
  """(loss_manual_vjp, logits Z2 (B, K)), both through the custom_vjp."""
  checks.check_all(params, X, y, weights)
  return _manual_vjp_loss_and_logits(net, params, *losses.as_arrays(X, y, weights))


@functools.partial(jax.jit, static_argnums=(0,))
def _manual_vjp_loss_and_logits(net: Network, params: Params, X: Array, y: Array,
                                weights: Optional[Array]) -> tuple[Array, Array]:
  """The custom_vjp of checked arrays, one program (outside jit too, not op by op)."""
  dtype = params.w1.dtype
  Y = losses.targets(y, params.w2.shape[0], dtype)   # float targets in the params' dtype
  if y.ndim == 1:  # int labels carry no gradient: close over them as one-hot targets
    Y = jax.lax.stop_gradient(Y)
  w = None if weights is None else weights.astype(dtype)
  return _manual_vjp_loss(net, params, X.astype(dtype), Y, w)


# value_and_grads_with_logits' methods: the manual pass in the faster layout (None) or
# in a fixed one (the benchmark's rows), jax.grad of loss_manual_vjp, jax.grad of mj.loss.
MANUAL_LAYOUTS = {"manual": None, "manual_batch_major": BATCH_MAJOR,
                  "manual_feature_major": FEATURE_MAJOR}
METHODS = (*MANUAL_LAYOUTS, "manual_vjp", "autodiff")


def value_and_grads_with_logits(params: Params, X: ArrayLike, y: ArrayLike,
                                weights: Optional[ArrayLike] = None, *,
                                method: str = "manual", net: Network = Network()
                                ) -> tuple[tuple[Array, Array], Params]:
  """((loss, logits Z2 (B, K)), Params of gradients) of the network `net`, by `method`
  (METHODS):

  "manual" (the closed form, `manual_pass`, in net's layout), "manual_batch_major" and
  "manual_feature_major" (the closed form in that layout), "manual_vjp"
  (jax.value_and_grad of loss_manual_vjp) or "autodiff" (jax.value_and_grad of
  mj.loss). A train step takes its accuracy from these logits instead of running the
  forward pass twice.
  """
  if method in MANUAL_LAYOUTS:
    layout = MANUAL_LAYOUTS[method] or net.layout
    return _manual_value_and_grads_with_logits(dataclasses.replace(net, layout=layout),
                                               params, X, y, weights)
  if method == "manual_vjp":
    return jax.value_and_grad(_loss_and_logits_manual_vjp, argnums=1, has_aux=True)(
        net, params, X, y, weights)
  if method != "autodiff":
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
  return jax.value_and_grad(losses.loss_and_logits, has_aux=True)(
      params, X, y, weights, activation=net.activation, compute_dtype=net.compute_dtype)
