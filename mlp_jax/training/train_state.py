"""TrainState and what updates it: the optax optimizer (clipping, weight decay, the
optimizer, the params' moving average), the learning-rate schedule, and a model's init.
train.py's steps and epochs apply them."""

from typing import Any, NamedTuple, Optional

import jax
from jax import Array
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from mlp_jax.base.options import OPTIMIZERS, SCHEDULES
from mlp_jax.training.spec import Hyperparams
from mlp_jax.core import model
from mlp_jax.core.model import Params


class TrainState(NamedTuple):
  """Everything a step changes: params, optimizer state, step count, base PRNG key."""

  params: Params
  opt_state: Any
  step: jax.Array    # int32 scalar: optimizer steps taken
  key: jax.Array     # uint32 (2,): the run's key; epoch e shuffles with fold_in(key, e)


def make_cycle(hp: Hyperparams, steps: int) -> optax.Schedule:
  """One cycle of `steps` steps: constant, cosine to 0, or linear warmup then cosine."""
  if hp.schedule == "constant":
    return optax.constant_schedule(hp.learning_rate)
  if hp.schedule == "cosine":
    return optax.cosine_decay_schedule(hp.learning_rate, max(steps, 1))
  if hp.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, hp.learning_rate, hp.warmup_steps, max(steps, hp.warmup_steps + 1))
  raise ValueError(f"unknown schedule {hp.schedule!r}; choose one of {', '.join(SCHEDULES)}.")


def make_schedule(hp: Hyperparams) -> optax.Schedule:
  """Learning rate per step: one cycle over total_steps, or, with restart_steps, a new
  cycle (warmup, then cosine to 0 at the next restart or total_steps) at each restart."""
  if _is_array(hp.learning_rate):  # one peak per model (a sweep): scale a unit schedule
    unit = make_schedule(hp._replace(learning_rate=1.0))
    return lambda step: hp.learning_rate * unit(step)
  bounds = (0, *hp.restart_steps, hp.total_steps)
  cycles = [make_cycle(hp, end - start) for start, end in zip(bounds, bounds[1:])]
  if len(cycles) == 1:
    return cycles[0]
  return optax.join_schedules(cycles, list(hp.restart_steps))


def _is_array(value: Any) -> bool:
  return not isinstance(value, (int, float))


def in_use(value: Any) -> bool:
  """Whether a hyperparameter's transformation is in the chain (and its state in the
  checkpoint): where its value, or any model's, is nonzero, whatever its form (a Python
  or NumPy scalar, an array of one per model); always where it is traced (a sweep's
  values inside the program), so that the models of a stack share one tree."""
  try:
    return bool(np.any(np.asarray(value) != 0))
  except jax.errors.TracerArrayConversionError:
    return True


class ParamsEMAState(NamedTuple):
  """The moving average of the params kept by `params_ema`."""

  count: jax.Array   # type: ignore[assignment]  # int32: steps averaged, t
  decay: jax.Array   # float32: β
  ema: Params        # θ̄_t = β θ̄_{t−1} + (1 − β) θ_t, from θ̄_0 = 0 (not yet debiased)


def params_ema(decay: ArrayLike) -> optax.GradientTransformation:
  """optax transformation, last in a chain: the exponential moving average of the params
  after each update (θ_t = params + updates); the updates pass through unchanged."""
  def init(params: Params) -> ParamsEMAState:
    return ParamsEMAState(jnp.zeros((), jnp.int32), jnp.asarray(decay, jnp.float32),
                          jax.tree.map(jnp.zeros_like, params))

  def update(updates: Params, state: ParamsEMAState, params: Optional[Params] = None
             ) -> tuple[Params, ParamsEMAState]:
    if params is None:
      raise ValueError("params_ema averages the params: pass them, "
                       "optimizer.update(updates, state, params).")
    new_params = optax.apply_updates(params, updates)
    ema = optax.incremental_update(new_params, state.ema, 1 - state.decay)
    return updates, state._replace(count=state.count + 1, ema=ema)

  return optax.GradientTransformation(init, update)


def averaged_params(state: TrainState) -> Params:
  """Params (w1 (H, D), b1, w2 (K, H), b2, each with a leading (M,) for a stack) that a
  run evaluates, chooses and saves: with --ema_decay, the bias-corrected average
  θ̄_t / (1 − β^t) (= the params before any step), else state.params."""
  ema_state = state.opt_state[-1] if isinstance(state.opt_state, tuple) else None
  if not isinstance(ema_state, ParamsEMAState):
    return state.params
  correction = 1 - ema_state.decay ** ema_state.count       # (M,) or ()

  def debiased(ema: Array, params: Array) -> Array:
    c = correction.reshape(correction.shape + (1,) * (ema.ndim - correction.ndim))
    return jnp.where(c > 0, ema / jnp.where(c > 0, c, 1), params)

  return jax.tree.map(debiased, ema_state.ema, state.params)


def make_optimizer(hp: Hyperparams) -> optax.GradientTransformation:
  """optax chain: [clip by global norm] -> [weight decay on W1, W2] -> the optimizer ->
  [the params' moving average, params_ema].

  adamw decays weights decoupled from the gradient; the others add wd·W to it (L2).
  Biases are never decayed.
  """
  lr = make_schedule(hp)
  weights_only = Params._make((True, False, True, False))   # a mask: Params of bools
  parts: list[optax.GradientTransformation] = []
  if in_use(hp.clip_norm):  # an array (a sweep) may be 0 for some models: no clip
    parts.append(optax.clip_by_global_norm(jnp.where(hp.clip_norm > 0, hp.clip_norm, jnp.inf)
                                           if _is_array(hp.clip_norm) else hp.clip_norm))
  if hp.optimizer == "adamw":
    parts.append(optax.adamw(lr, weight_decay=hp.weight_decay, mask=weights_only))
  else:
    if in_use(hp.weight_decay):
      parts.append(optax.add_decayed_weights(hp.weight_decay, mask=weights_only))
    if hp.optimizer == "sgd":
      parts.append(optax.sgd(lr))
    elif hp.optimizer == "momentum":
      parts.append(optax.sgd(lr, momentum=0.9, nesterov=True))
    elif hp.optimizer == "adam":
      parts.append(optax.adam(lr))
    else:
      raise ValueError(f"unknown optimizer {hp.optimizer!r}; choose one of "
                       f"{', '.join(OPTIMIZERS)}.")
  if in_use(hp.ema_decay):
    parts.append(params_ema(hp.ema_decay))
  return optax.chain(*parts)


def init_model_state(seed: ArrayLike, in_dim: int, hidden_dim: int, num_classes: int,
                     optimizer: optax.GradientTransformation) -> TrainState:
  """ONE model's fresh TrainState: PRNGKey(seed) split in two, init_params from the
  first key, and the second kept as the state's key (batch order, DP noise). A run's
  state is a stack of these: see init_state."""
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init_params(init_key, in_dim, hidden_dim, num_classes)
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), data_key)
