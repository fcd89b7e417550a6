"""Differentially private training (DP-SGD) at the cost of one ordinary step.

Each example's gradient of W1 and W2 is an outer product (δ1 xᵀ, δ2 a1ᵀ), so its norm is
a closed form and the SUM of clipped per-example gradients is the ordinary batched
backward pass with row i of Δ1, Δ2 scaled by its clip factor c_i = min(1, C / ‖g_i‖):

    ‖∇_{W1,b1} L_i‖² = ‖δ1_i‖² (‖x_i‖² + 1)       ‖∇_{W2,b2} L_i‖² = ‖δ2_i‖² (‖a1_i‖² + 1)
    Σ_i c_i ∇_{W1} L_i = (c ⊙ Δ1)ᵀ X               Σ_i c_i ∇_{W2} L_i = (c ⊙ Δ2)ᵀ A1

with δ1 from the UNclipped δ2. Nothing of size B·H·D (or B·K·H) is formed.
docs/derivation.md derives it; tests/test_privacy.py proves it equals
jax.vmap(jax.grad) -> clip -> sum.

DP-SGD (Abadi et al. 2016): Poisson-sample each example with rate q, sum the clipped
gradients, add N(0, σ² S²) per coordinate (S: the sensitivity, C for flat clipping),
divide by the EXPECTED batch size q·N, and account for the Poisson-subsampled Gaussian
with Google's dp-accounting (PLD, RDP beside it), add-or-remove-one neighbours.
"""

import dataclasses
import functools
import math
from typing import Any, Iterable, NamedTuple, Optional, Union

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from mlp_jax.base.options import CLIPPINGS, DP_EXTRA
from mlp_jax.base.options import dp_available  # pylint: disable=unused-import  (public)
from mlp_jax.core import checks, losses
from mlp_jax.core.gradients import deltas, mean_grad_sq_norms, param_grads
from mlp_jax.core.model import Params
from mlp_jax.core.network import Network

# The PLD accountant's grid; its estimate is an upper bound (pessimistic) at any grid.
PLD_DISCRETIZATION = 1e-3

# A clip norm: C, a per-model C traced inside a stack's program, or (C1, C2) per layer.
ClipNorm = Union[float, Array, tuple[float, float]]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["norm"],
                   meta_fields=["clipping", "copies"])
@dataclasses.dataclass(frozen=True)
class Clip:
  """How each example's gradient is bounded: `norm` (a ClipNorm: an array under jit,
  one per model in a stack), `clipping` ("flat" or "per_layer", static), and `copies`
  (static): an example is that many consecutive rows (augmented copies, De et al.
  2022's augmentation multiplicity), its gradient their mean, clipped as one."""

  norm: ClipNorm
  clipping: str = "flat"
  copies: int = 1


def layer_clip_norms(clip_norm: ClipNorm, clipping: str) -> tuple[Any, Any]:
  """(C1, C2): the bounds on layer 1's and layer 2's per-example gradient norms.

  flat: one bound C on the whole gradient (C1 = C2 = C, applied jointly). per_layer: a
  float C is split as C1 = C2 = C/√2, so the sensitivity √(C1² + C2²) is C; a pair
  (C1, C2) sets each layer's bound.
  """
  if clipping not in CLIPPINGS:
    raise ValueError(f"clipping must be one of {', '.join(CLIPPINGS)}, got {clipping!r}.")
  c1: Any
  c2: Any
  if isinstance(clip_norm, (tuple, list)):
    if clipping != "per_layer":
      raise ValueError(f"a pair of clip norms {clip_norm!r} is one per layer: pass "
                       f"Clip({clip_norm!r}, 'per_layer') (clipping per_layer), or one clip "
                       "norm C.")
    c1, c2 = clip_norm
  elif clipping == "per_layer":
    c1 = c2 = clip_norm / math.sqrt(2.0)
  else:
    c1 = c2 = clip_norm
  concrete = all(isinstance(c, (int, float, np.number)) for c in (c1, c2))
  if concrete and not (c1 > 0 and c2 > 0):  # a traced C (jit, vmap) is the caller's
    raise ValueError(f"the clip norm must be > 0, got {clip_norm!r}.")
  return c1, c2


def sensitivity(clip_norm: ClipNorm, clipping: str) -> Union[float, Array]:
  """The L2 sensitivity S of the clipped sum to one example: C (flat), √(C1² + C2²)
  (per_layer: an example moves each layer's sum by at most its own bound)."""
  c1, c2 = layer_clip_norms(clip_norm, clipping)
  if clipping == "flat":
    return c1
  concrete = all(isinstance(c, (int, float, np.number)) for c in (c1, c2))
  return math.hypot(c1, c2) if concrete else jnp.hypot(c1, c2)  # traced: one per model


def clip_factor(norm: Array, bound: ArrayLike) -> Array:
  """c = min(1, C / ‖g‖), (B,): 1 for a zero gradient (no division by 0), 0 where the
  norm is not finite (that row must contribute nothing)."""
  factor = jnp.where(norm > bound, bound / jnp.where(norm > bound, norm, 1), 1)
  return jnp.where(jnp.isfinite(norm), factor, 0).astype(norm.dtype)


def clipped_sum_with_logits(net: Network, params: Params, X: Array, Y: Array, mask: Array,
                            clip: Clip) -> tuple[tuple[Array, Array], Params, Array]:
  """((Σ_i m_i CE_i, logits Z2 (R, K)), Σ_i m_i c_i g_i as Params, norms) for R rows of
  targets Y (R, K) and a mask (R,), unchecked: the train step's core; see
  clipped_grad_sum. gradients.py's pass (`deltas`, each row's own), with each row of
  Δ1 and Δ2 scaled by its example's clip factor before the sums over rows. With
  clip.copies = K, example i is rows i·K .. i·K + K − 1 (its mask alike on each): g_i
  is their mean gradient, CE_i their mean loss, and the norms (R / K,) are the means'."""
  clipping, k = clip.clipping, clip.copies
  c1_bound, c2_bound = layer_clip_norms(clip.norm, clipping)
  d = deltas(net, params, X, Y)                                     # δ2_r, δ1_r
  sq1, sq2 = mean_grad_sq_norms(d, X, k)                            # per layer, (R / K,)
  if clipping == "flat":
    norms = jnp.sqrt(sq1 + sq2)
    c1 = c2 = clip_factor(norms, c1_bound)
  else:
    norms = jnp.stack([jnp.sqrt(sq1), jnp.sqrt(sq2)], axis=-1)
    c1, c2 = clip_factor(norms[:, 0], c1_bound), clip_factor(norms[:, 1], c2_bound)
  finite = jnp.repeat(jnp.isfinite(sq1 + sq2), k)          # each example's, on its rows
  c1, c2 = jnp.repeat(c1, k) / k, jnp.repeat(c2, k) / k     # 1/K: the mean over copies
  # A padding row, or one whose gradient is not finite, contributes exactly 0: `where`,
  # not a product, so that a NaN or inf in it cannot leak through 0 · NaN.
  keep = ((mask > 0) & finite)[:, None]
  m = mask.astype(X.dtype)
  grad_sum = param_grads(net, jnp.where(keep, (m * c1)[:, None] * d.delta1, 0),
                         jnp.where(keep, (m * c2)[:, None] * d.delta2, 0),
                         jnp.where(keep, X, 0), jnp.where(keep, d.A1, 0))
  loss_sum = jnp.sum(jnp.where(mask > 0, m * losses.cross_entropy(d.Z2, Y), 0)) / k
  return (loss_sum, d.Z2), grad_sum, norms


def clipped_grad_sum(params: Params, X: ArrayLike, y: ArrayLike,
                     clip_norm: Union[ClipNorm, Clip], mask: Optional[ArrayLike] = None, *,
                     activation: str = "relu") -> tuple[Params, Array]:
  """Σ_i m_i c_i ∇L_i, the sum of per-example gradients clipped to norm C, and the norms.

  One forward and one backward pass (the closed form in this module's docstring); no
  per-example gradient is formed. X (B, D); y labels (B,) or targets (B, K); mask (B,)
  of 0/1 (padding rows 0; default all 1); clip_norm C (flat clipping), or a Clip:
  Clip(C, "per_layer") clips each layer to C/√2, Clip((C1, C2), "per_layer") each to
  its own. A row whose gradient is not finite contributes 0. Returns (Params, norms):
  norms are the UNclipped ‖g_i‖ (B,) (flat) or [‖∇_{W1,b1} L_i‖, ‖∇_{W2,b2} L_i‖]
  (B, 2) (per_layer).
  """
  net = Network(activation)
  clip = clip_norm if isinstance(clip_norm, Clip) else Clip(clip_norm)
  b, _, _, _ = checks.check_all(params, X, y, mask, weights_name="mask", mean=False)
  c1, c2 = layer_clip_norms(clip.norm, clip.clipping)   # checked here, where C is a number
  bounds = c1 if clip.clipping == "flat" else (c1, c2)
  mask = jnp.ones((b,), params.w1.dtype) if mask is None else mask
  return _clipped_grad_sum(net, params, *losses.as_arrays(X, y, mask),
                           Clip(bounds, clip.clipping))


@functools.partial(jax.jit, static_argnums=(0,))
def _clipped_grad_sum(net: Network, params: Params, X: Array, y: Array, mask: Array,
                      clip: Clip) -> tuple[Params, Array]:
  """clipped_grad_sum of checked arrays, one program (outside jit too, not op by op)."""
  dtype = params.w1.dtype
  Y = losses.targets(y, params.w2.shape[0], dtype)
  _, grad_sum, norms = clipped_sum_with_logits(net, params, X.astype(dtype), Y, mask, clip)
  return grad_sum, norms


def add_noise(grad_sum: Params, key: Array, noise_multiplier: ArrayLike, clip_norm: ClipNorm,
              clipping: str, expected_batch_size: float) -> Params:
  """(Σ clipped + N(0, σ² S² I)) / (q·N): the private gradient estimate, Params.

  S = sensitivity(clip_norm, clipping); the divisor is the EXPECTED batch size q·N, not
  the realised one (which is itself private). One normal draw per coordinate, from `key`.
  """
  std = noise_multiplier * sensitivity(clip_norm, clipping)
  keys = jax.random.split(key, len(grad_sum))
  noisy = [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(grad_sum, keys)]
  return Params(*[g / expected_batch_size for g in noisy])


# Poisson sampling: every example joins each step's batch independently with rate q.

def padded_batch_size(num_examples: int, sampling_rate: float, steps: int,
                      overflow_probability: float = 1e-9, multiple: int = 1
                      ) -> tuple[int, float]:
  """(M, p): the fixed batch M that a Poisson batch ~ Binomial(N, q) exceeds at some
  step of `steps` with probability p ≤ overflow_probability (union bound over steps;
  scipy's exact binomial tail). M is rounded up to a multiple of `multiple` (devices)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  per_step = overflow_probability / max(steps, 1)
  m = int(stats.binom.isf(per_step, num_examples, sampling_rate)) + 1
  m = min(-(-m // multiple) * multiple, -(-num_examples // multiple) * multiple)
  p = min(1.0, steps * float(stats.binom.sf(m, num_examples, sampling_rate)))
  return m, p


def poisson_batch(key: Array, num_examples: int, sampling_rate: ArrayLike, padded_size: int
                  ) -> tuple[Array, Array, Array]:
  """Indices (M,), mask (M,) and overflow (bool) of one Poisson-sampled batch.

  Example j is in the batch when u_j < q for u ~ U[0, 1)^N from `key`, drawn in float32
  (the same batches with x64 on or off, so a resume redraws them). Its indices fill
  the first slots of M; the rest are index 0 with mask 0. overflow is True when more
  than M were sampled (those beyond M would be lost: the caller must stop).
  """
  chosen = jax.random.uniform(key, (num_examples,), jnp.float32) < sampling_rate
  count = jnp.sum(chosen)
  (idx,) = jnp.nonzero(chosen, size=padded_size, fill_value=0)
  mask = (jnp.arange(padded_size) < count).astype(jnp.float32)
  return idx, mask, count > padded_size


class DPSGD(NamedTuple):
  """What a DP-SGD step needs: σ, C, clipping, q, N, the padded batch M, and the
  augmented copies of each example whose mean gradient is clipped (Clip.copies)."""

  noise_multiplier: float
  clip_norm: float
  clipping: str
  sampling_rate: float
  num_examples: int
  padded_batch_size: int
  augmult: int = 1


def step_keys(key: Array, step: ArrayLike) -> tuple[Array, Array]:
  """(sampling key, noise key) of optimizer step `step`, from the run's key alone: a
  resumed run draws the same batches and the same noise."""
  sample_root, noise_root = jax.random.split(jax.random.fold_in(key, 0x5EED_D9))
  return jax.random.fold_in(sample_root, step), jax.random.fold_in(noise_root, step)


# Accounting: dp-accounting's PLD accountant (RDP beside it), Poisson-sampled Gaussian.

def _dp_accounting() -> Any:
  try:
    import dp_accounting  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"differential privacy needs dp-accounting: {DP_EXTRA}") from None
  return dp_accounting


def _dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> Any:
  dpa = _dp_accounting()
  return dpa.SelfComposedDpEvent(
      dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(noise_multiplier)),
      int(steps))


def _accountant(kind: str) -> Any:
  dpa = _dp_accounting()
  if kind == "pld":
    return dpa.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
  if kind == "rdp":
    return dpa.rdp.RdpAccountant()
  raise ValueError(f"accountant must be 'pld' or 'rdp', got {kind!r}.")


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld") -> float:
  """ε of `steps` DP-SGD steps (Poisson rate q, noise σ) at δ, add-or-remove-one.

  "pld": privacy loss distributions (tight, an upper bound on its grid); "rdp": Rényi DP
  (looser, the classic TF Privacy number). 0 steps spend ε = 0.
  """
  if steps == 0:
    return 0.0
  acc = _accountant(accountant)
  acc.compose(_dp_sgd_event(noise_multiplier, sampling_rate, steps))
  return float(acc.get_epsilon(delta))


def epsilon_of_runs(noise_multipliers: Iterable[float], sampling_rate: float, steps: int,
                    delta: float) -> float:
  """PLD ε at δ of releasing ALL of several DP-SGD runs on the same data (one σ each,
  the same q and steps): their composition, the bound for releasing every model of a
  sweep, hence any one chosen among them. Runs of equal σ compose as one run of their
  total steps."""
  if steps == 0:
    return 0.0
  counts: dict[float, int] = {}
  for sigma in noise_multipliers:
    counts[float(sigma)] = counts.get(float(sigma), 0) + 1
  return _epsilon_of_groups(tuple(sorted(counts.items())), sampling_rate, steps, delta)


@functools.lru_cache(maxsize=256)
def _epsilon_of_groups(groups: tuple[tuple[float, int], ...], sampling_rate: float,
                       steps: int, delta: float) -> float:
  acc = _accountant("pld")
  for sigma, count in groups:
    acc.compose(_dp_sgd_event(sigma, sampling_rate, steps * count))
  return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)  # pure, and seconds each: a resume or a sweep asks again
def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, max_noise_multiplier: float = 100.0) -> float:
  """The smallest σ (to 1e-3) whose PLD ε after `steps` steps at rate q is ≤ target ε.

  Raises ValueError when no σ ≤ max_noise_multiplier reaches it.
  """
  if epsilon(max_noise_multiplier, sampling_rate, steps, delta) > target_epsilon:
    raise ValueError(f"no noise multiplier up to {max_noise_multiplier:g} reaches ε = "
                     f"{target_epsilon:g} at δ = {delta:g} in {steps} steps of sampling "
                     f"rate {sampling_rate:.4g}; allow a larger ε, fewer epochs or a "
                     "smaller batch.")
  least = 0.1  # the bracket's low end, and the least --dp_noise_multiplier
  if epsilon(least, sampling_rate, steps, delta) <= target_epsilon:
    raise ValueError(f"ε = {target_epsilon:g} is more than even σ = {least:g} spends "
                     f"({epsilon(least, sampling_rate, steps, delta):.3g} at δ = {delta:g} "
                     f"in {steps} steps): it promises no privacy; ask for a smaller ε.")
  from scipy import optimize  # pylint: disable=g-import-not-at-top  (only here)

  def gap(sigma: float) -> float:  # ε(σ) − target ε, through the cached `epsilon`
    return epsilon(sigma, sampling_rate, steps, delta) - target_epsilon

  # Brent's method on [least, max] as dp_accounting.calibrate_dp_mechanism runs it, but
  # its ends read from the cache (ε at σ = 0.1 alone takes seconds).
  sigma = optimize.brentq(gap, least, max_noise_multiplier, xtol=1e-3)
  # Brent's answer is within tol of the boundary: step up until it is on the safe side.
  while gap(sigma) > 0:
    sigma += 1e-3
  return float(sigma)


